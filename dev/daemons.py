"""What dev/dovecot.py and dev/postfix.py share: a daemon of the tests' own, started by root in a folder.

Each runs from a folder of its own (a temporary one, or one kept between starts by ``make airflow``), is
started by a command whose master forks into the background, and is ready once it answers on its port.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def own_folder(kept: Path | None, prefix: str) -> Path:
    """``kept``, or a new temporary folder; root's and open to others (mkdtemp makes 0700): the daemon's
    unprivileged processes must enter it."""
    folder = kept or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    return folder


def run_forking(command: list[str], errors: Path, failed: Callable[[str], str]) -> None:
    """Run a command whose master forks into the background. The master keeps its inherited output open, so
    a pipe would never reach its end: its errors go to the file ``errors``, and ``failed(their text)`` is
    the RuntimeError's message when the command fails."""
    with errors.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=stderr)
    if done.returncode != 0:
        raise RuntimeError(failed(errors.read_text().strip()))


def wait_until_answering(probe: Callable[[], None], refused: tuple[type[Exception], ...], what: str,
                         log: Callable[[], str], timeout: float = 10.0) -> None:
    """Call ``probe`` (a greeting on the daemon's port) until it no longer raises one of ``refused``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except refused:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {timeout:.0f} s: {log()[-2000:]}") from None
            time.sleep(0.05)
