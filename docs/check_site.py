"""Check the built documentation site in a real headless browser, offline.

    python docs/check_site.py                 # builds the site into a temporary folder first
    python docs/check_site.py --site site     # or checks a site already built (make docs)
    python docs/check_site.py --all --screenshots /tmp/shots

The site is served from its folder on 127.0.0.1 and loaded in headless Chromium (Debian:
``apt-get install chromium-headless-shell``, or ``chromium``; ``--browser PATH`` for another),
driven over the DevTools protocol on a pipe (no Python package needed). The browser resolves
no host name but 127.0.0.1, so a page that needed the network would fail here. For each page:

* maths: every arithmatex formula was typeset by MathJax (an ``mjx-container``, no
  ``mjx-merror``), and no raw ``\\(``, ``\\[``, ``$$``, ``$x$`` or reST role
  (``:class:`...```, ``:math:`...```, ``.. math::``) is left in the text outside code;
* code: every code block with a language is coloured (Pygments token spans, and a keyword's
  computed colour differs from plain code's), and so is every API signature;
* layout: no table or code block sticks out of the content column unless it scrolls there,
  and the page itself does not scroll sideways;
* loading: no script error, no failed or non-local request, no HTTP error from the server
  (which also sees MathJax's fonts and the search index being fetched);

and the search page finds results for a query. Exit status 0 when all pass, 1 otherwise,
2 when no browser is found. ``tests/test_docs.py`` runs it (a slow test).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import http.server
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
            "google-chrome-stable", "headless_shell", "chrome")
# a formula page, an API page, the wide tables, the home page, a how-to with code
PAGES = ("", "getting-started/", "concepts/paths/", "concepts/likelihood/", "api/sampling/",
         "api/metrics/", "api/studies/", "benchmarks/", "howto/solver-study/")
SEARCH_QUERY = "likelihood"

# Run in the page once MathJax has finished: what a reader would see.
PAGE_FACTS = r"""
(() => {
  const main = document.querySelector('.rst-content [role=main]')
    || document.querySelector('.rst-content') || document.body;
  const facts = {};
  const math = [...main.querySelectorAll('.arithmatex')];
  facts.formulas = math.length;
  facts.untypeset = math.filter(e => !e.querySelector('mjx-container'))
    .map(e => e.textContent.trim().slice(0, 80));
  facts.math_errors = [...main.querySelectorAll('mjx-merror')]
    .map(e => e.getAttribute('data-mjx-error') || e.textContent.slice(0, 80));

  const skip = 'pre, code, script, style, textarea, mjx-container, .arithmatex';
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const raw = [];
  const patterns = [/\\\(/, /\\\)/, /\\\[/, /\\\]/, /\$\$/, /\$[^\s$][^$\n]*\$/,
                    /:(class|func|meth|mod|data|attr|exc|obj|math):`/, /\.\. math::/];
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (node.parentElement.closest(skip)) continue;
    const text = node.textContent;
    for (const p of patterns) {
      const m = text.match(p);
      if (m) { raw.push(text.slice(Math.max(0, m.index - 30), m.index + 50).trim()); break; }
    }
  }
  facts.raw_markup = raw;

  const blocks = [...main.querySelectorAll('pre > code')];
  facts.code_blocks = blocks.length;
  facts.uncoloured = [];
  let coloured = 0;
  for (const code of blocks) {
    const box = code.closest('[class*="language-"], .doc-signature');
    const lang = box && ([...box.classList].find(c => c.startsWith('language-')) || 'signature');
    const tokens = code.querySelectorAll('span[class]').length;
    if (tokens) coloured += 1;
    else if (lang && !/^language-(text|console|output)$/.test(lang))
      facts.uncoloured.push(lang + ': ' + code.textContent.trim().slice(0, 60));
  }
  facts.coloured_blocks = coloured;
  const kw = main.querySelector('.highlight code .k, .highlight code .kn, .highlight code .nf');
  facts.keyword_colour = kw ? getComputedStyle(kw).color : null;
  facts.code_colour = kw ? getComputedStyle(kw.closest('code')).color : null;

  const column = (main.closest('.wy-nav-content') || main).getBoundingClientRect();
  const scrolls = el => /(auto|scroll)/.test(getComputedStyle(el).overflowX);
  facts.cut_off = [];
  for (const el of main.querySelectorAll('table, pre')) {
    let box = el;
    for (let a = el; a && a !== main; a = a.parentElement)
      if (scrolls(a)) { box = a; break; }
    const right = box.getBoundingClientRect().right;
    const clipped = box === el && el.scrollWidth > el.clientWidth + 1 && !scrolls(el);
    if (right > column.right + 1 || clipped)
      facts.cut_off.push(el.tagName.toLowerCase() + ': '
                         + el.textContent.trim().replace(/\s+/g, ' ').slice(0, 60));
  }
  facts.page_scrolls_sideways = document.documentElement.scrollWidth > window.innerWidth + 1;

  // MathJax's menu items that would load components the site does not ship
  const menu = window.MathJax && MathJax.startup && MathJax.startup.document
    && MathJax.startup.document.menu && MathJax.startup.document.menu.menu;
  facts.menu_items_enabled = !menu ? [] : [['Settings', 'Renderer', 'SVG'],
    ['Accessibility', 'Activate'], ['Accessibility', 'AutoCollapse'],
    ['Accessibility', 'Collapsible']].filter(ids => {
      const item = menu.findID(...ids); return item && !item.disabled;
    }).map(ids => ids.join(' > '));
  facts.title = document.title;
  return facts;
})()
"""

WAIT_FOR_MATHJAX = r"""
(window.MathJax && MathJax.startup && MathJax.startup.promise)
  ? Promise.race([MathJax.startup.promise.then(() => 'typeset'),
                  new Promise(resolve => setTimeout(() => resolve('still running after 30 s'),
                                                    30000))])
  : Promise.resolve('no MathJax')
"""

WAIT_FOR_SEARCH = r"""
new Promise(resolve => {
  const start = Date.now();
  (function poll() {
    const found = document.querySelectorAll('#mkdocs-search-results article').length;
    if (found || Date.now() - start > 20000) resolve(found); else setTimeout(poll, 100);
  })();
})
"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site folder and records (path, status) of every request."""

    log: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.log.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, *args):  # quiet
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, list[tuple[str, int]]]:
    log: list[tuple[str, int]] = []
    handler = type("Handler", (_Handler,), {"log": log})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, log


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, executable: str, width: int = 1280, height: int = 900):
        self._profile = tempfile.mkdtemp(prefix="check-site-profile-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():  # in the child: the pipe ends become fds 3 and 4
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [executable, "--headless", "--remote-debugging-pipe", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--window-size={width},{height}", f"--user-data-dir={self._profile}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        self._process = subprocess.Popen(args, preexec_fn=fds, close_fds=False,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue[dict] = queue.Queue()
        self._lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=self.session)

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._replies[message["id"]] = message
                        self._lock.notify_all()
                else:
                    self._events.put(message)
        with self._lock:
            self._replies[-1] = {"error": {"message": "the browser closed the pipe"}}
            self._lock.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._id not in self._replies and -1 not in self._replies:
                if not self._lock.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"{method}: no answer in {timeout} s")
            reply = self._replies.pop(self._id, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def events(self) -> list[dict]:
        out = []
        while not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    def evaluate(self, expression: str, timeout: float = 60):
        result = self.call("Runtime.evaluate", session=self.session, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def open(self, url: str, timeout: float = 60) -> list[dict]:
        """Load ``url``, wait for its load event; the events seen meanwhile."""
        self.events()
        self.call("Page.navigate", session=self.session, url=url)
        deadline, seen = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            seen.append(event)
            if event.get("method") == "Page.loadEventFired":
                return seen
        raise TimeoutError(f"{url}: not loaded in {timeout} s")

    def screenshot(self, path: Path, max_height: int = 6000) -> None:
        """A PNG of the whole page (down to ``max_height`` CSS pixels)."""
        import base64

        size = self.call("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"],
                "height": min(size["height"], max_height), "scale": 1}
        data = self.call("Page.captureScreenshot", session=self.session, format="png",
                         captureBeyondViewport=True, clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)


def find_browser(name: str | None) -> str | None:
    if name:
        return shutil.which(name) or (name if Path(name).is_file() else None)
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def build_site(into: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    subprocess.run([*command, "build", "--strict", "--quiet", "--site-dir", str(into)],
                   cwd=ROOT, check=True)


def _loading_problems(events: list[dict], origin: str) -> list[str]:
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            problems.append(f"script error: {text}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            problems.append(f"console error: {params['entry']['text']}"
                            f" {params['entry'].get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith((origin, "data:", "blob:", "about:")):
                problems.append(f"request outside the site: {url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            problems.append(f"failed to load: {params.get('errorText')}")
        elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
            problems.append(f"HTTP {params['response']['status']}: {params['response']['url']}")
    return problems


def check_page(browser: Browser, origin: str, page: str) -> tuple[list[str], dict]:
    events = browser.open(f"{origin}/{page}")
    state = browser.evaluate(WAIT_FOR_MATHJAX)
    time.sleep(0.2)  # late font and console events
    facts = browser.evaluate(PAGE_FACTS)
    problems = _loading_problems(events + browser.events(), origin)
    if facts["formulas"] and state != "typeset":
        problems.append(f"{facts['formulas']} formulas but MathJax did not run ({state})")
    problems += [f"formula not typeset: {t}" for t in facts["untypeset"]]
    problems += [f"MathJax error: {t}" for t in facts["math_errors"]]
    problems += [f"raw markup in the text: {t!r}" for t in facts["raw_markup"]]
    problems += [f"code block not coloured: {t}" for t in facts["uncoloured"]]
    if facts["keyword_colour"] and facts["keyword_colour"] == facts["code_colour"]:
        problems.append(f"keywords have the colour of plain code ({facts['code_colour']}):"
                        " the Pygments style sheet is not applied")
    problems += [f"cut off at the right: {t}" for t in facts["cut_off"]]
    if facts["page_scrolls_sideways"]:
        problems.append("the page scrolls sideways")
    problems += [f"MathJax menu item {t!r} enabled: it would load a component the site lacks"
                 for t in facts["menu_items_enabled"]]
    return problems, facts


def check_search(browser: Browser, origin: str, query: str) -> tuple[list[str], int]:
    events = browser.open(f"{origin}/search.html?q={query}")
    found = browser.evaluate(WAIT_FOR_SEARCH, timeout=40)
    problems = _loading_problems(events + browser.events(), origin)
    if not found:
        problems.append(f"the search for {query!r} shows no result")
    return problems, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, help="a built site (default: build one now)")
    parser.add_argument("--browser", help="the Chromium executable (default: found on PATH)")
    parser.add_argument("--all", action="store_true", help="every page, not only a sample")
    parser.add_argument("--pages", nargs="+", help="pages to check, e.g. concepts/paths/")
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each page here")
    args = parser.parse_args(argv)

    executable = find_browser(args.browser)
    if executable is None:
        print("no headless browser found: apt-get install chromium-headless-shell "
              "(or chromium), or pass --browser", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="check-site-") as scratch:
        site = args.site
        if site is None:
            site = Path(scratch) / "site"
            print("building the site ...", flush=True)
            build_site(site)
        site = site.resolve()
        if args.pages:
            pages = args.pages
        elif args.all:
            pages = sorted(str(p.parent.relative_to(site)) + "/"
                           for p in site.rglob("index.html") if p.parent != site)
            pages = ["", *pages]
        else:
            pages = list(PAGES)
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)

        browser = Browser(executable)
        server, log = serve(site)
        origin = f"http://127.0.0.1:{server.server_address[1]}"
        failures = 0
        try:
            for page in pages:
                start = time.monotonic()
                try:
                    problems, facts = check_page(browser, origin, page)
                except (TimeoutError, RuntimeError) as err:
                    problems, facts = [str(err)], {"formulas": "?", "coloured_blocks": "?",
                                                   "code_blocks": "?"}
                failures += bool(problems)
                print(f"{'FAIL' if problems else 'ok  '} /{page}: {facts['formulas']} formulas,"
                      f" {facts['coloured_blocks']}/{facts['code_blocks']} code blocks coloured"
                      f" ({time.monotonic() - start:.1f} s)")
                for problem in problems:
                    print(f"       {problem}")
                if args.screenshots:
                    name = page.strip("/").replace("/", "_") or "index"
                    browser.screenshot(args.screenshots / f"{name}.png")
            problems, found = check_search(browser, origin, SEARCH_QUERY)
            index_served = any(p.startswith("/search/search_index.json") and s == 200
                               for p, s in log)
            if not index_served:
                problems.append("search/search_index.json was not served")
            failures += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} search for {SEARCH_QUERY!r}: {found} results")
            for problem in problems:
                print(f"       {problem}")
        finally:
            browser.close()
            server.shutdown()
            server.server_close()
        errors = sorted({f"{s} {p}" for p, s in log if s >= 400})
        for error in errors:
            print(f"FAIL server answered {error}")
        fonts = sum(p.endswith(".woff") and s == 200 for p, s in log)
        print(f"{len(log)} requests served, {fonts} MathJax fonts, {len(errors)} errors")
        failures += len(errors)
    print("all checks passed" if not failures else f"{failures} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
