import sys

from hv.cli.main import main

sys.exit(main())
