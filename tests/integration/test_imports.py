"""What a stage process imports, checked in a fresh interpreter (a process of its own)."""

import subprocess
import sys

from tests.defaults import ROOT


def test_the_stages_that_train_nothing_never_import_lightning():
    # These four stages run no Trainer: importing Lightning would only slow their start.
    lightning = "{'pytorch_lightning', 'lightning_fabric'}"
    code = (
        "import sys; import stages.prepare, stages.preferences, stages.reference, stages.evaluate; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {lightning}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
