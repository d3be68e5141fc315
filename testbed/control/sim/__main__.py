import sys

from testbed.control.sim.run import main

sys.exit(main())
