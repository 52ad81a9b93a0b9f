"""Print, from a pytest JUnit XML file, how many tests of each test file ran and how many skipped.

Usage: python per_file.py junit.xml. .ci/packaging prints it for each one-framework venv, so the log
shows which files ran tests of that framework and which skipped whole (they need both frameworks).
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET

counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
for case in ET.parse(sys.argv[1]).iter("testcase"):
    name = case.get("classname", "").split(".")[1] if "." in case.get("classname", "") else case.get("classname", "")
    outcome = "skipped" if case.find("skipped") is not None else "failed" if (
        case.find("failure") is not None or case.find("error") is not None) else "ran"
    counts[name][outcome] += 1
for name in sorted(counts):
    c = counts[name]
    print(f"  {name}: {c['ran']} ran, {c['skipped']} skipped" + (f", {c['failed']} failed" if c["failed"] else ""))
