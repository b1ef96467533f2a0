import sys

from ray_lifelong.cli import main

sys.exit(main())
