"""The DVC stages' entry points (`python -m stages.<stage>`), one module per stage of dvc.yaml.

With `STAGES_WARM_SOCKET` set, a stage's process hands itself to a warm server before it imports anything heavy
(stages/warm.py). The server and its children were started otherwise (`sys.orig_argv` is the server's own
`python -m stages.warm ...`), so only a process started as a stage hands itself over.
"""

import os
import sys

if os.environ.get("STAGES_WARM_SOCKET") and sys.orig_argv[1:2] == ["-m"] and sys.orig_argv[2:3] != ["stages.warm"]:
    from stages.warm import hand_over

    hand_over()
