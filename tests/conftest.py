"""Suite-wide pytest set-up: the Hypothesis profile the fuzz tests run under.

The fuzz tests (tests/smtp/test_wire_fuzz.py, tests/test_message_fuzz.py)
take their budget from here, so the whole fuzz run stays under ~20 s on a busy
machine: a fixed number of examples, no per-example deadline (a loaded 2-core
machine is slow, not wrong), and under CI a derandomized run, so a red build
repeats as it is.
Locally the examples vary from run to run and a failure is kept in
.hypothesis/ and tried first next time.
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fuzz test files say so themselves when they import it
    pass
else:
    _ci = bool(os.environ.get("CI"))
    settings.register_profile(
        "mailhost",
        max_examples=100,
        deadline=None,
        # CI: the same examples every run, and no example database left behind.
        derandomize=_ci,
        **({"database": None} if _ci else {}),
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mailhost"))
