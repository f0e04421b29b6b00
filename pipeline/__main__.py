import os
import sys

from .cli import main

code = main()
if code and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun a failure every rank raised is left at once, streams flushed, without
    # the interpreter's teardown: torchrun stops the ranks still running as soon as one has
    # exited with an error, so the ranks must leave within moments of each other to all
    # exit with the error's own code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
