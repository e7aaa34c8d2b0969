"""Drives the broker's /audit page in headless Chromium (Debian's chromium + chromedriver,
through selenium) the way an auditor uses it: sign in, see the chart, filter, open a record.

Run by tests/audit_page.rs, which starts the broker, seeds the log and passes what to expect
in the environment; it prints one JSON line of observations and exits non-zero on the first
expectation that fails, naming it.
"""

import json
import os
import shutil
import struct
import sys
import zlib

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

BASE = os.environ["AUDIT_URL"]
EXPECT = json.loads(os.environ["AUDIT_EXPECT"])
observed = {}


def check(condition, what):
    if not condition:
        print(json.dumps(observed), flush=True)
        sys.exit(f"audit page: {what}")


def chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


NEW_PAGE_LOADED = "return window.credbrokerOldPage === undefined && document.readyState === 'complete'"


def click_and_load(driver, element):
    """Clicks what leads to another page and waits until that page has loaded: the click
    returns while the old page is still in place, and on a busy machine reading it then finds
    the old page's elements, gone a moment later (StaleElementReferenceException).

    The old page is marked with a window property that the next page cannot have. Watching an
    old element go stale instead (selenium's staleness_of) is racy: while the documents swap,
    chromedriver can answer "Node with given id does not belong to the document", a plain
    WebDriverException that staleness_of does not catch. Any WebDriverException while the
    pages swap is read as "not loaded yet"."""
    driver.execute_script("window.credbrokerOldPage = true")
    element.click()
    WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(NEW_PAGE_LOADED)
    )


def sign_in(driver, token):
    driver.get(BASE + "/audit")
    check(driver.find_elements(By.ID, "sign-in"), "the sign-in form is shown without a session")
    driver.find_element(By.ID, "token").send_keys(token)
    click_and_load(driver, driver.find_element(By.CSS_SELECTOR, "#sign-in button"))


def rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#records tbody tr")


def cell(row, column):
    return row.find_elements(By.TAG_NAME, "td")[column].text


# Pixels of the first target's bar colour (#2563eb) on the canvas: bars, not just axes.
BAR_PIXELS = """
const canvas = document.getElementById('timeline');
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let bars = 0, painted = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i + 3] > 0) painted++;
  if (Math.abs(data[i] - 37) < 12 && Math.abs(data[i + 1] - 99) < 12 && Math.abs(data[i + 2] - 235) < 12 && data[i + 3] > 200) bars++;
}
return [bars, painted, canvas.width, canvas.height];
"""

def png_rows(png):
    """Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium's screenshots are)."""
    check(png[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is a PNG")
    position, compressed = 8, b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position:position + 4])
        kind, body = png[position + 4:position + 8], png[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed += body
    check(depth == 8 and interlace == 0 and colour in (2, 6), "an 8-bit RGB(A) screenshot")
    channels = 4 if colour == 6 else 3
    raw, stride, previous, rows = zlib.decompress(compressed), width * channels, bytearray(width * channels), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, up_left = previous[x], (previous[x - channels] if x >= channels else 0)
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + ((left + up) >> 1)) & 255
            elif kind == 4:
                guess = left + up - up_left
                nearest = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - up_left), 2, up_left))[2]
                line[x] = (line[x] + nearest) & 255
        rows.append((line, channels))
        previous = line
    return rows


def bar_pixels_in(png):
    count = 0
    for line, channels in png_rows(png):
        for x in range(0, len(line), channels):
            if abs(line[x] - 37) < 12 and abs(line[x + 1] - 99) < 12 and abs(line[x + 2] - 235) < 12:
                count += 1
    return count


driver = chromium()
try:
    # A caller [auditors] does not bind is refused, and gets no session.
    sign_in(driver, os.environ["OUTSIDER_TOKEN"])
    observed["outsider"] = driver.find_element(By.TAG_NAME, "h1").text
    check(observed["outsider"] == "Not an auditor", "a non-auditor is refused")
    driver.get(BASE + "/audit")
    check(driver.find_elements(By.ID, "sign-in"), "a refused sign-in leaves no session behind")

    # Load: the auditor signs in and lands on the log with its chart.
    sign_in(driver, os.environ["AUDITOR_TOKEN"])
    check(driver.current_url.rstrip("/").endswith("/audit"), "sign-in leads to the log")
    observed["reader"] = driver.find_element(By.ID, "reader").text
    check(EXPECT["reader"] in observed["reader"], "the page names who is signed in")
    listed = [link.text for link in driver.find_elements(By.CSS_SELECTOR, "#records a.detail-link")]
    observed["rows"] = len(listed)
    check(all(short_id in listed for short_id in EXPECT["seeded_ids"]), "every seeded row is listed")
    canvas = driver.find_element(By.ID, "timeline")
    observed["datasets"] = int(canvas.get_attribute("data-rendered") or "0")
    check(observed["datasets"] == EXPECT["datasets"], "one bar series per target and decision")
    bars, painted, width, height = driver.execute_script(BAR_PIXELS)
    observed["chart"] = {"bar_pixels": bars, "painted_pixels": painted, "width": width, "height": height}
    check(width > 300 and height > 200, "the chart has a size")
    check(bars > 200, "the chart draws bars in the first target's colour")
    legend = driver.execute_script("return Chart.getChart('timeline').data.datasets.map(d => d.label)")
    observed["legend"] = legend
    check(sorted(legend) == sorted(EXPECT["legend"]), "the legend names each target's issued and denied series")
    driver.save_screenshot(os.environ["SCREENSHOT"])
    # What a person would see: the chart's screenshot has bars, not only the legend's swatch
    # (about 500 pixels of that colour).
    observed["screenshot_bar_pixels"] = bar_pixels_in(canvas.screenshot_as_png)
    check(observed["screenshot_bar_pixels"] > 1500, "a screenshot of the chart shows its bars")

    # Filter: by project glob and decision, through the form.
    driver.find_element(By.ID, "filter-project_path").send_keys(EXPECT["filter_project"])
    Select(driver.find_element(By.ID, "filter-decision")).select_by_visible_text("denied")
    # The form is a plain GET: read the rows once the filtered page has loaded, not while the
    # old one is being replaced (a loaded machine showed an empty table in between).
    click_and_load(driver, driver.find_element(By.ID, "search"))
    filtered = rows(driver)
    observed["filtered"] = [(cell(row, 1), cell(row, 5)) for row in filtered]
    check(len(filtered) == EXPECT["filtered_rows"], f"the filter keeps exactly {EXPECT['filtered_rows']} rows")
    check(all(decision == "denied" and project.startswith(EXPECT["filter_prefix"]) for decision, project in observed["filtered"]), "every row matches the filter")
    check("project_path=" in driver.current_url and "decision=denied" in driver.current_url, "filters are in the URL, so a view can be shared")

    # A bad filter is named on the page, not a blank error.
    driver.get(BASE + "/audit?sha=xyz")
    observed["bad_filter"] = driver.find_element(By.ID, "message").text
    check(observed["bad_filter"].startswith("sha:"), "a bad filter names the parameter")

    # Detail: the hostile record, opened from the table.
    driver.get(BASE + "/audit?role=" + EXPECT["detail_role"])
    click_and_load(driver, driver.find_element(By.CSS_SELECTOR, "a.detail-link"))
    observed["detail_id"] = driver.find_element(By.ID, "record-id").text
    check(observed["detail_id"] == EXPECT["detail_id"], "the link opens that record")
    claims = {row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text for row in driver.find_elements(By.CSS_SELECTOR, "#claims tr")}
    observed["claims"] = claims
    for name, value in EXPECT["detail_claims"].items():
        check(claims.get(name) == value, f"claim {name} is shown as it was, markup and all")
    check(driver.execute_script("return window.credbrokerPwned === undefined && document.scripts.length === 2"), "a claim's markup did not run or add a script")
    links = {a.get_attribute("data-kind"): a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "a.git-link")}
    observed["links"] = links
    check(links == EXPECT["detail_links"], "commit, pipeline and user link back to the Git server")
    driver.save_screenshot(os.environ["SCREENSHOT"].replace(".png", "-record.png"))

    # No Content-Security-Policy violation or script error anywhere on the way. (The refused
    # sign-in and the bad filter answered 403 and 400 on purpose; Chromium logs those statuses.)
    expected = ("/audit/session - Failed to load resource: the server responded with a status of 403",
                "/audit?sha=xyz - Failed to load resource: the server responded with a status of 400")
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "favicon" not in entry["message"] and not any(e in entry["message"] for e in expected)]
    observed["console_errors"] = problems
    check(not problems, "the browser console shows no errors")

    # Sign out: back to the form, and the log is no longer readable.
    driver.get(BASE + "/audit")
    click_and_load(driver, driver.find_element(By.CSS_SELECTOR, "form.session button"))
    check(driver.find_elements(By.ID, "sign-in"), "signing out ends the session")
finally:
    driver.quit()

print(json.dumps(observed), flush=True)
