"""The compiler: DSL, IR and ops, autodiff, optimizer, planner and codegen."""
