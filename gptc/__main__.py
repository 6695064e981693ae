import sys

from gptc.tools.cli import main

if __name__ == "__main__":  # kernel compile workers re-import this module
    sys.exit(main())
