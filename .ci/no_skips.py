"""Fail unless a JUnit XML report (pytest --junitxml) ran tests and none of them skipped.

`make test-hf4` uses it: its tests exist to run under transformers 4.x, and a skip there (a wrong
transformers on the path, a missing framework) would pass silently.
"""

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> int:
    suites = ET.parse(path).getroot().iter("testsuite")
    cases = [case for suite in suites for case in suite.iter("testcase")]
    skipped = [f"{c.get('classname')}::{c.get('name')}" for c in cases if c.find("skipped") is not None]
    if not cases or skipped:
        print(f"[no_skips] {path}: {len(cases)} tests, skipped: {skipped or 'none ran'}", file=sys.stderr)
        return 1
    print(f"[no_skips] {path}: {len(cases)} tests ran, none skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
