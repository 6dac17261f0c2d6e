"""Print the main Debian archive that this machine's apt uses (for debootstrap).

Reads deb822 ``*.sources`` files and one-line ``sources.list`` files; takes the first enabled
``deb`` entry of a release suite (not ``-security`` or ``-updates``) with the ``main``
component. Prints nothing when there is none.
"""

from __future__ import annotations

import glob
import re


def candidates() -> list[str]:
    found: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            text = f.read()
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, list[str]] = {}
            for line in stanza.splitlines():
                m = re.match(r"([A-Za-z-]+):\s*(.*)", line)
                if m:
                    fields[m[1].lower()] = m[2].split()
            if (
                "deb" in fields.get("types", [])
                and "main" in fields.get("components", [])
                and any("-" not in suite for suite in fields.get("suites", []))
                and fields.get("enabled", ["yes"]) != ["no"]
            ):
                found += fields.get("uris", [])
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)", line)
            if m and "-" not in m[2] and "main" in m[3].split():
                found.append(m[1])
    return [uri for uri in found if uri.startswith(("http://", "https://"))]


if __name__ == "__main__":
    print(next(iter(candidates()), ""))
