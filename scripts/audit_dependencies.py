"""pip-audit of the locked dependencies: every package uv.lock pins (all groups), each accepted
vulnerability explained in pyproject.toml (``[tool.tokvel.audit.ignore]``: id -> reason).

    .venv/bin/python scripts/audit_dependencies.py [--uv PATH] [--strict]      (make audit)

pip-audit asks PyPI for the known vulnerabilities of each pinned version
(``/pypi/NAME/VERSION/json``). Where PyPI does not answer that (some mirrors serve only the
project-level document, ``/pypi/NAME/json``), the project-level document is read instead: its
``vulnerabilities`` are those of the project's newest release, so it answers exactly for a
package pinned at its newest release. A package pinned below it is then listed as not audited.

Exit status 1 when a vulnerability is found that is not ignored with a reason, or, with
``--strict`` (where pip-audit's per-version source is reachable), when a package could not be
audited; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT: Final = Path(__file__).resolve().parents[1]
PROJECT_URL: Final = "https://pypi.org/pypi/{name}/json"
FETCH_SECONDS: Final = 120
FETCH_THREADS: Final = 8


@dataclass
class Package:
    name: str
    version: str
    source: str = "not audited"  # "pip-audit", "project page" or "not audited"
    vulns: list[str] = field(default_factory=list)  # ids not ignored
    ignored: list[str] = field(default_factory=list)
    note: str = ""


def say(line: str) -> None:
    sys.stdout.write(line + "\n")


def ignore_list() -> dict[str, str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    section: dict[str, dict[str, str]] = config.get("tool", {}).get("tokvel", {}).get("audit", {})
    return dict(section.get("ignore", {}))


def export_requirements(uv: str, path: Path) -> None:
    subprocess.run(  # noqa: S603 - uv with fixed arguments
        [
            uv,
            "export",
            "--frozen",
            "--all-packages",
            "--all-groups",
            "--no-emit-workspace",
            "--format",
            "requirements-txt",
            "--output-file",
            str(path),
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def run_pip_audit(requirements: Path, ignored: dict[str, str]) -> list[dict[str, Any]]:
    flags = [arg for vuln in ignored for arg in ("--ignore-vuln", vuln)]
    done = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
        [
            sys.executable,
            "-m",
            "pip_audit",
            "--requirement",
            str(requirements),
            "--no-deps",
            "--disable-pip",
            "--format",
            "json",
            "--progress-spinner",
            "off",
            *flags,
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if not done.stdout.strip():
        raise SystemExit(f"pip-audit failed:\n{done.stderr}")
    dependencies: list[dict[str, Any]] = json.loads(done.stdout)["dependencies"]
    return dependencies


def _pinned(requirements: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, rest = line.partition("==")
            pins[canonicalize_name(name.strip())] = rest.split(";")[0].split()[0].rstrip("\\")
    return pins


def _from_project_page(package: Package, ignored: dict[str, str]) -> None:
    url = PROJECT_URL.format(name=package.name)
    try:
        with urllib.request.urlopen(url, timeout=FETCH_SECONDS) as response:  # noqa: S310 - https
            document = json.load(response)
    except OSError as exc:
        package.note = f"project page unavailable: {exc}"
        return
    newest = document["info"]["version"]
    if Version(newest) != Version(package.version):
        package.note = (
            f"pinned below the newest release ({newest}): needs pip-audit's per-version answer"
        )
        return
    package.source = "project page"
    for vuln in document.get("vulnerabilities", []):
        if vuln.get("withdrawn"):
            continue
        names = {vuln["id"], *vuln.get("aliases", [])}
        (package.ignored if names & ignored.keys() else package.vulns).append(vuln["id"])


def audit(uv: str, ignored: dict[str, str]) -> list[Package]:
    with tempfile.TemporaryDirectory(prefix="tokvel-audit-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        export_requirements(uv, requirements)
        pins = _pinned(requirements)
        results = run_pip_audit(requirements, ignored)
    packages = []
    for result in results:
        name = canonicalize_name(result["name"])
        package = Package(name, result.get("version") or pins.get(name, "?"))
        if "skip_reason" not in result:
            package.source = "pip-audit"
            package.vulns = [v["id"] for v in result.get("vulns", [])]
        packages.append(package)
    skipped = [p for p in packages if p.source == "not audited"]
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        list(pool.map(lambda p: _from_project_page(p, ignored), skipped))
    return packages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--uv", default=shutil.which("uv") or "uv", help="the uv executable")
    parser.add_argument(
        "--strict", action="store_true", help="a package that could not be audited fails too"
    )
    args = parser.parse_args()
    ignored = ignore_list()
    packages = sorted(audit(args.uv, ignored), key=lambda p: p.name)
    vulnerable = [p for p in packages if p.vulns]
    unaudited = [p for p in packages if p.source == "not audited"]
    for package in vulnerable:
        say(f"  VULNERABLE {package.name} {package.version}: {', '.join(package.vulns)}")
    for package in unaudited:
        say(f"  not audited {package.name} {package.version}: {package.note}")
    for vuln, reason in sorted(ignored.items()):
        say(f"  ignored {vuln}: {reason}")
    by_source = {s: sum(p.source == s for p in packages) for s in ("pip-audit", "project page")}
    failed = bool(vulnerable) or (args.strict and bool(unaudited))
    say(
        f"audit of {len(packages)} locked packages: {by_source['pip-audit']} by pip-audit, "
        f"{by_source['project page']} by their project page, {len(unaudited)} not audited; "
        f"{sum(len(p.vulns) for p in packages)} vulnerabilities, "
        f"{sum(len(p.ignored) for p in packages)} ignored with a reason: "
        + ("FAILED" if failed else "ok")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
