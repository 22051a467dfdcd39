"""The wheel carries the licence texts (LGPL-3.0-only, with the GPL-3.0 it builds on), the
start-up hook, and a mergekit requirement that accepts the 0.1.x releases."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mergekit_ace-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        licence = archive.read(f"{info}/licenses/LICENSE").decode()
        gpl = archive.read(f"{info}/licenses/COPYING").decode()
    assert "License-Expression: LGPL-3.0-only" in metadata.splitlines()
    assert "Requires-Dist: mergekit<0.2,>=0.1.5" in metadata.splitlines()
    assert licence == (ROOT / "LICENSE").read_text()
    assert " ".join(licence.split()[:7]) == "GNU LESSER GENERAL PUBLIC LICENSE Version 3,"
    assert (
        "incorporates\nthe terms and conditions of version 3 of the GNU General Public" in licence
    )
    assert gpl == (ROOT / "COPYING").read_text()
    assert " ".join(gpl.split()[:6]) == "GNU GENERAL PUBLIC LICENSE Version 3,"
    assert {"mergekit_ace.pth", "_mergekit_ace_autoload.py", "mergekit_ace/compat.py"} <= set(names)
