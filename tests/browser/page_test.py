#!/usr/bin/env python3
"""Browser test of the page that `streamdet serve` serves at `/`.

Runs headless Chromium (selenium) against an already-running server and checks what a user sees:
  1. a video: a `person` detection and the end summary appear, boxes are drawn over the video
     (non-transparent overlay pixels), and a screenshot of it is not blank;
  2. random bytes: an error message in words appears in #error;
  3. an image: boxes are drawn over it and a `person` is listed;
  4. tracking (with --tracking-video, the walking cat): "Track objects" ticked and a vertical
     counting line clicked across the middle of the video before it is sent; the boxes carry a
     track id, the line's counts go up while the video is processed and end at 1 in and 1 out,
     and one cat is tracked. With --annotated, "Annotated video" is ticked too and the link that
     `end` brings must play in a <video> element.

    python page_test.py --base http://127.0.0.1:PORT --video VIDEO --image IMAGE \
        --junk JUNKFILE --screenshot OUT.png [--tracking-video CLIP [--annotated]]

Exit code 0 when every step passes; otherwise a message on stderr says which step failed and why.
"""
import argparse
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


class Failure(Exception):
    pass


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the server, e.g. http://127.0.0.1:8080")
    p.add_argument("--page", help="the page's URL (default: BASE/)")
    p.add_argument("--video", required=True, help="a video with a person in it")
    p.add_argument("--image", required=True, help="a photo of a person")
    p.add_argument("--junk", required=True, help="a file of random bytes")
    p.add_argument("--screenshot", required=True, help="where to save the screenshot of the video case (PNG)")
    p.add_argument("--image-screenshot", help="also save a screenshot of the image case here")
    p.add_argument("--tracking-video", help="a video of one cat crossing the middle once each way")
    p.add_argument("--tracking-screenshot", help="also save a screenshot of the tracking case here")
    p.add_argument("--annotated", action="store_true", help="also ask for the annotated video and play it")
    p.add_argument("--stride", help="set the page's stride field before choosing the video")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the video's results")
    p.add_argument("--window", default="1280,1000", help="browser window size, WIDTH,HEIGHT")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    return p.parse_args()


def start_browser(args):
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--mute-audio", "--autoplay-policy=no-user-gesture-required",
                 f"--window-size={args.window}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(args.chromedriver), options=options)


def text(driver, css):
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def wait_for(driver, what, seconds, condition):
    """Waits until `condition(driver)` is truthy; a timeout is a Failure naming `what`."""
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        raise Failure(f"timed out after {seconds:.0f} s waiting for {what}; "
                      f"status: {text(driver, '#status')!r}; error: {text(driver, '#error')!r}") from None


def page_state(driver):
    return driver.execute_script("""
        const q = (s) => document.querySelector(s);
        return {
          state: q('#status').dataset.state,
          status: q('#status').innerText,
          error: q('#error').hidden ? '' : q('#error').innerText,
          notice: q('#notice').hidden ? '' : q('#notice').innerText,
          summaryShown: !q('#summary').hidden,
          classes: [...document.querySelectorAll('#class-counts li[data-class]')]
                     .map((li) => [li.dataset.class, Number(li.dataset.count)]),
          rows: q('#detections').tBodies[0].rows.length,
          frames: q('#frames').innerText,
          ttfd: q('#ttfd').innerText,
          drawn: Number(q('#overlay').dataset.drawn || 0),
        };
    """)


def choose_file(driver, path):
    driver.find_element(By.ID, "file").send_keys(os.path.abspath(path))


def overlay_opaque_pixels(driver):
    return driver.execute_script("""
        const c = document.getElementById('overlay');
        if (!c.width || !c.height) return 0;
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n += 1;
        return n;
    """)


def load_pixels(path):
    try:
        from PIL import Image
        import numpy as np
        return np.asarray(Image.open(path).convert("RGB"), dtype=float)
    except ImportError:
        import skimage.io
        return skimage.io.imread(path)[..., :3].astype(float)


def step_video(driver, args):
    print(f"[video] choosing {args.video}")
    if args.stride:
        field = driver.find_element(By.ID, "stride")
        field.clear()
        field.send_keys(args.stride)
    choose_file(driver, args.video)
    # Detections arrive while the upload is going on; the summary comes with the `end` event.
    wait_for(driver, "the first processed frame", args.timeout,
             lambda d: page_state(d)["state"] == "error" or int(d.find_element(By.ID, "frames").get_attribute("data-count")) > 0)
    state = wait_for(driver, "the end summary", args.timeout,
                     lambda d: (lambda s: s if s["summaryShown"] or s["state"] == "error" else None)(page_state(d)))
    if state["state"] == "error":
        raise Failure(f"the video failed: {state['error']!r}")
    print(f"[video] status: {state['status']!r}")
    print(f"[video] frames: {state['frames']!r}; time to first detection: {state['ttfd']!r}; rows: {state['rows']}")
    print(f"[video] class counts: {state['classes']}")
    summary = driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#summary dd[data-key]')]"
        ".map((dd) => [dd.dataset.key, dd.innerText]));")
    print(f"[video] summary: {summary}")
    for key in ("frames_decoded", "frames_processed", "sha256", "seconds", "upload_seconds"):
        if not summary.get(key):
            raise Failure(f"the summary lacks {key}: {summary}")
    if len(summary["sha256"]) != 64:
        raise Failure(f"the summary's sha256 is not 64 hex digits: {summary['sha256']!r}")
    if "person" not in dict(state["classes"]):
        raise Failure(f"no person among the detections per class: {state['classes']}")
    person_pts = driver.execute_script(
        "const r = document.querySelector('#detections tr[data-class=\"person\"][data-pts]');"
        "return r ? Number(r.dataset.pts) : null;")
    if person_pts is None:
        raise Failure("no person row with a time in #detections")
    print(f"[video] first person at pts {person_pts}")

    if state["notice"]:
        # A browser without this codec lists the detections but draws nothing: the list was checked.
        print(f"[video] WARNING: this browser cannot play the video, so no boxes are drawn: {state['notice']!r}")
    else:
        # Show the frame with the person: pause there and wait for the overlay to draw it.
        driver.execute_script(
            "const v = document.getElementById('video'); v.pause(); v.currentTime = arguments[0] + 0.01;", person_pts)
        wait_for(driver, "boxes drawn over the video at the person's frame", 30,
                 lambda d: d.execute_script(
                     "const v = document.getElementById('video'), c = document.getElementById('overlay');"
                     "return !v.seeking && v.readyState >= 2 && Number(c.dataset.drawn) > 0"
                     " && Math.abs(Number(c.dataset.pts) - arguments[0]) < 1e-6;", person_pts))
        opaque = overlay_opaque_pixels(driver)
        drawn = driver.find_element(By.ID, "overlay").get_attribute("data-drawn")
        print(f"[video] overlay: {drawn} boxes drawn, {opaque} non-transparent canvas pixels")
        if opaque < 100:
            raise Failure(f"the overlay has only {opaque} non-transparent pixels")
    driver.execute_script("window.scrollTo(0, 0);")
    driver.save_screenshot(args.screenshot)
    pixels = load_pixels(args.screenshot)
    std = float(pixels.std())
    print(f"[video] screenshot {args.screenshot}: {pixels.shape[1]}x{pixels.shape[0]}, pixel std {std:.1f}")
    if std < 10:
        raise Failure(f"the screenshot looks blank (pixel standard deviation {std:.1f})")


def step_junk(driver, args):
    print(f"[junk] choosing {args.junk}")
    choose_file(driver, args.junk)
    state = wait_for(driver, "an error message in #error", 60,
                     lambda d: (lambda s: s if s["state"] == "done" or (s["state"] == "error" and s["error"].strip()) else None)(page_state(d)))
    if state["state"] != "error":
        raise Failure(f"random bytes were accepted: status {state['status']!r}")
    message = state["error"].strip()
    print(f"[junk] #error says: {message!r}")
    if len(message.split()) < 3:
        raise Failure(f"the error is not a message in words: {message!r}")


def step_image(driver, args):
    print(f"[image] choosing {args.image}")
    choose_file(driver, args.image)
    state = wait_for(driver, "the image's result", 60,
                     lambda d: (lambda s: s if s["state"] in ("done", "error") else None)(page_state(d)))
    if state["state"] == "error":
        raise Failure(f"the image failed: {state['error']!r}")
    if state["error"]:
        raise Failure(f"an error is still shown after the image: {state['error']!r}")
    wait_for(driver, "boxes drawn over the image", 15,
             lambda d: int(d.find_element(By.ID, "overlay").get_attribute("data-drawn") or 0) > 0)
    state = page_state(driver)
    opaque = overlay_opaque_pixels(driver)
    print(f"[image] status: {state['status']!r}; class counts: {state['classes']}; "
          f"{state['drawn']} boxes drawn, {opaque} non-transparent canvas pixels")
    if "person" not in dict(state["classes"]):
        raise Failure(f"no person detected in the image: {state['classes']}")
    if opaque < 100:
        raise Failure(f"the overlay over the image has only {opaque} non-transparent pixels")
    if args.image_screenshot:
        driver.save_screenshot(args.image_screenshot)
        print(f"[image] screenshot {args.image_screenshot}")


def set_field(driver, field_id, value):
    field = driver.find_element(By.ID, field_id)
    field.clear()
    if value:
        field.send_keys(value)


def tick(driver, box_id):
    box = driver.find_element(By.ID, box_id)
    if not box.is_selected():
        box.click()


def step_tracking(driver, args):
    print(f"[tracking] choosing {args.tracking_video} with tracking and a counting line")
    # Every frame: the counts must not depend on which frames the stride leaves out.
    set_field(driver, "stride", "1")
    tick(driver, "track")
    if args.annotated:
        tick(driver, "annotate")
    # Records the line's counts each time they change, and whether the summary was shown yet:
    # counts that change before the end come from the live crossing events.
    driver.execute_script("""
        window.lineCountsSeen = [];
        new MutationObserver(() => {
          const li = document.querySelector('#line-counts li[data-line]');
          if (li) window.lineCountsSeen.push([Number(li.dataset.in), Number(li.dataset.out),
                                               !document.getElementById('summary').hidden]);
        }).observe(document.getElementById('line-counts'), { childList: true, subtree: true });
    """)
    driver.find_element(By.ID, "draw-line").click()
    choose_file(driver, args.tracking_video)
    # The video is shown, paused, and waits for the line; the overlay takes the clicks once it
    # covers the picture.
    wait_for(driver, "the video to wait for the counting line", 30, lambda d: d.execute_script("""
        const v = document.getElementById('video'), c = document.getElementById('overlay');
        const a = v.getBoundingClientRect(), b = c.getBoundingClientRect();
        return document.getElementById('status').dataset.state === 'waiting' && v.videoWidth > 0
          && c.classList.contains('drawing') && a.width > 0 && Math.abs(a.left - b.left) < 1
          && Math.abs(a.top - b.top) < 1 && Math.abs(a.width - b.width) < 1 && Math.abs(a.height - b.height) < 1;
    """))
    overlay = driver.find_element(By.ID, "overlay")
    height = overlay.size["height"]
    # A vertical line through the middle, from near the top to near the bottom (offsets are from
    # the element's centre).
    for dy in (-height // 2 + 10, height // 2 - 10):
        ActionChains(driver).move_to_element_with_offset(overlay, 0, dy).click().perform()
    print(f"[tracking] line: {text(driver, '#line-info')!r}")
    state = wait_for(driver, "the end summary", args.timeout,
                     lambda d: (lambda s: s if s["summaryShown"] or s["state"] == "error" else None)(page_state(d)))
    if state["state"] == "error":
        raise Failure(f"the tracking video failed: {state['error']!r}")
    print(f"[tracking] status: {state['status']!r}; frames: {state['frames']!r}")
    result = driver.execute_script("""
        const line = document.querySelector('#line-counts li[data-line]');
        return {
          line: line ? { name: line.dataset.line, points: line.dataset.points || '', in: Number(line.dataset.in),
                         out: Number(line.dataset.out), text: line.innerText } : null,
          tracks: [...document.querySelectorAll('#track-counts li[data-class]')]
                    .map((li) => [li.dataset.class, Number(li.dataset.count)]),
          final: document.getElementById('track-counts').dataset.final === '1',
          tracked: document.querySelector('#detections tr[data-track][data-pts]')
                     ? Number(document.querySelector('#detections tr[data-track][data-pts]').dataset.pts) : null,
          seen: window.lineCountsSeen,
        };
    """)
    print(f"[tracking] line counts: {result['line']}; tracks per class: {result['tracks']}")
    line = result["line"]
    if not line or not line["points"]:
        raise Failure(f"the counting line was not sent: {line}")
    x1, y1, x2, y2 = map(float, line["points"].split(","))
    if abs(x1 - 320) > 3 or abs(x2 - 320) > 3 or abs(y2 - y1) < 400:
        raise Failure(f"the clicked line is not the vertical line x=320 in video pixels: {line['points']}")
    if (line["in"], line["out"]) != (1, 1):
        raise Failure(f"the line should count 1 in and 1 out: {line}")
    if not any(i + o > 0 and not done for i, o, done in result["seen"]):
        raise Failure(f"the line's counts did not change before the end: {result['seen']}")
    if not result["final"] or dict(result["tracks"]) != {"cat": 1}:
        raise Failure(f"one cat should be tracked: {result['tracks']} (final: {result['final']})")
    if result["tracked"] is None:
        raise Failure("no row of #detections has a track id")

    # The box at a tracked frame carries its track id.
    pts = result["tracked"]
    driver.execute_script(
        "const v = document.getElementById('video'); v.pause(); v.currentTime = arguments[0] + 0.01;", pts)
    ids = wait_for(driver, "a box with a track id drawn over the video", 30, lambda d: d.execute_script(
        "const v = document.getElementById('video'), c = document.getElementById('overlay');"
        "return !v.seeking && v.readyState >= 2 && Math.abs(Number(c.dataset.pts) - arguments[0]) < 1e-6"
        " && c.dataset.trackIds;", pts))
    print(f"[tracking] track ids drawn at {pts}: {ids!r}")
    if args.tracking_screenshot:
        driver.execute_script("window.scrollTo(0, 0);")
        driver.save_screenshot(args.tracking_screenshot)
        print(f"[tracking] screenshot {args.tracking_screenshot}")

    if args.annotated:
        link = wait_for(driver, "the annotated video's link", 10, lambda d: d.execute_script(
            "const a = document.getElementById('annotated-link'); return a ? [a.href, a.innerText] : null;"))
        print(f"[tracking] annotated video: {link[1]!r} at {link[0]}")
        played = driver.execute_async_script("""
            const [url, done] = arguments;
            const v = document.createElement('video');
            v.muted = true;
            document.body.append(v);
            const give = (what) => { clearInterval(timer); done(what); };
            v.addEventListener('error', () => give({ error: v.error ? v.error.code : 'unknown' }));
            const timer = setInterval(() => { if (v.currentTime > 0.3) give({ time: v.currentTime }); }, 100);
            setTimeout(() => give({ time: v.currentTime, timeout: true }), 15000);
            v.src = url;
            v.play().catch((e) => give({ error: String(e) }));
        """, link[0])
        print(f"[tracking] the annotated video played: {played}")
        if played.get("error") or played.get("timeout"):
            raise Failure(f"the annotated video does not play in a <video> element: {played}")


def main():
    args = parse_args()
    page = args.page or args.base.rstrip("/") + "/"
    driver = start_browser(args)
    try:
        print(f"[page] loading {page}")
        driver.get(page)
        health = wait_for(driver, "the page to ask /health", 30,
                          lambda d: d.execute_script("const h = document.body.dataset.health; return h !== 'loading' && h;"))
        print(f"[page] health: {health}; model info: {text(driver, '#model-info')!r}")
        if health != "ok":
            raise Failure(f"the page could not reach the server: {text(driver, '#model-info')!r}")
        step_video(driver, args)
        step_junk(driver, args)
        step_image(driver, args)
        if args.tracking_video:
            step_tracking(driver, args)
        print("PASS: video, junk, image" + (" and tracking" if args.tracking_video else "") + " cases behave")
        return 0
    except (Failure, WebDriverException) as err:
        print(f"FAIL: {err}", file=sys.stderr)
        try:
            for entry in driver.get_log("browser"):
                print(f"  browser console: {entry.get('level')} {entry.get('message')}", file=sys.stderr)
            failed = os.path.splitext(args.screenshot)[0] + "-failure.png"
            driver.save_screenshot(failed)
            print(f"  screenshot of the failure: {failed}", file=sys.stderr)
        except WebDriverException:
            pass
        return 1
    finally:
        driver.quit()


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"[page] took {time.monotonic() - started:.1f} s")
    sys.exit(code)
