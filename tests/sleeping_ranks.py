"""A torchrun module for tests/test_signals.py: each rank writes its pid and torchrun's, then sleeps."""

import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    pids = Path(sys.argv[1]).read_text().strip()  # the config file names the folder for the pid files
    Path(pids, f"rank{os.environ['RANK']}").write_text(f"{os.getpid()} {os.getppid()}")
    time.sleep(600)
