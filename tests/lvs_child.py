"""Child process of tests/test_sharded_lvs.py: experiments/lvs.py with every file-system write logged.

  python tests/lvs_child.py WRITE_LOG [experiments/lvs.py flags ...]

The write log (an audit hook, `dist_child._install_write_log`) lets the test check that under
jax.distributed only process 0 wrote into the workdir.
"""

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
  sys.path.insert(0, HERE)
  from dist_child import _install_write_log

  _install_write_log(sys.argv[1])
  main = os.path.join(os.path.dirname(HERE), "experiments", "lvs.py")
  sys.argv = [main, *sys.argv[2:]]
  runpy.run_path(main, run_name="__main__")
