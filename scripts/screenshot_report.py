"""Screenshot a run report in headless Chromium (the README's picture).

mixtune demo && python scripts/screenshot_report.py runs/demo/report.html docs/report.png
"""

import argparse

from mixtune.report.browser import screenshot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", help="report HTML file")
    ap.add_argument("out", help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1600)
    args = ap.parse_args()
    print(screenshot(args.page, args.out, args.width, args.height))


if __name__ == "__main__":
    main()
