import sys

from gptc.cli import main

sys.exit(main())
