"""The Gradio demo, served in-process on a free localhost port with the tiny model, driven by gradio_client and
a browser."""

import os
import socket
from pathlib import Path

import pytest
from PIL import Image


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")

from conftest import shape_picture  # noqa: E402

import app  # noqa: E402


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir):
    """The app as `python app.py` runs it, with MODEL_ID pointing at the tiny model folder."""
    previous = os.environ.get("MODEL_ID")
    os.environ["MODEL_ID"] = str(tiny_model_dir)
    try:
        demo = app.main(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    finally:
        os.environ.pop("MODEL_ID") if previous is None else os.environ.update(MODEL_ID=previous)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_generate_endpoint_returns_an_engraving_and_its_caption(client, tiny_config):
    image_path, caption = client.predict(7, api_name="/generate")
    assert Image.open(image_path).size == (tiny_config.image_size, tiny_config.image_size)
    assert isinstance(caption, str) and caption
    assert client.predict(7, api_name="/generate")[1] == caption


def test_random_seed_endpoint_gives_a_seed_in_range(client):
    assert 0 <= client.predict(api_name="/random_seed") <= app.MAX_SEED


def test_batch_endpoint_gives_a_captioned_gallery_of_n_engravings(client):
    gallery = client.predict(3, 4, api_name="/batch")
    assert len(gallery) == 4
    assert all(Image.open(item["image"]).size == (32, 32) and item["caption"] for item in gallery)


def test_interpolate_endpoint_gives_one_captioned_image_per_step(client):
    strip = client.predict(0, 1, 5, api_name="/interpolate")
    assert len(strip) == 5
    assert all(item["caption"] for item in strip)


def test_imagine_endpoint_draws_a_caption(client):
    image_path = client.predict("An engraving depicting a circle on the left", 0, 0.5, api_name="/imagine")
    assert Image.open(image_path).size == (32, 32)


def test_caption_endpoint_captions_an_uploaded_picture(client, tmp_path):
    from gradio_client import handle_file

    shape_picture("circle", "left", 64)[0].save(tmp_path / "circle.png")
    caption, image_path = client.predict(handle_file(str(tmp_path / "circle.png")), api_name="/caption")
    assert isinstance(caption, str) and caption
    assert Image.open(image_path).size == (32, 32)


@pytest.mark.parametrize(
    "api_name, arguments, message",
    [
        ("/generate", (-1,), "less than minimum value 0"),
        ("/generate", (app.MAX_SEED + 1,), f"greater than maximum value {app.MAX_SEED}"),
        ("/batch", (0, app.MAX_BATCH_SIZE + 1), f"greater than maximum value {app.MAX_BATCH_SIZE}"),
        ("/batch", (app.MAX_SEED, 2), "The last seed must be"),
        (
            "/interpolate",
            (0, 1, app.MAX_INTERPOLATION_STEPS + 1),
            f"greater than maximum value {app.MAX_INTERPOLATION_STEPS}",
        ),
        ("/imagine", ("   ", 0, 0.5), "Write a caption of 1 to"),
        ("/imagine", ("a ship " * 100, 0, 0.5), "Write a caption of 1 to"),
        ("/imagine", ("a ship", 0, 2.0), "greater than maximum value 1"),
    ],
)
def test_invalid_inputs_get_a_clear_message(client, api_name, arguments, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*arguments, api_name=api_name)


def test_a_file_that_is_not_an_image_gets_a_clear_message(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(AppError, match="broken.png is not an image that can be read"):
        client.predict(handle_file(str(tmp_path / "broken.png")), api_name="/caption")


def test_a_ten_thousand_pixel_square_picture_is_refused_before_it_is_decoded(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    # A flat 10,000 x 10,000 PNG is a few hundred KB on disk, under the upload limit: a decompression bomb.
    Image.new("L", (10_000, 10_000), 240).save(tmp_path / "vast.png", optimize=True)
    assert (tmp_path / "vast.png").stat().st_size < 1024 * 1024
    with pytest.raises(AppError, match="vast.png is 10000 x 10000 pixels, more than the"):
        client.predict(handle_file(str(tmp_path / "vast.png")), api_name="/caption")


def test_twenty_concurrent_seed_requests_are_all_answered(client, app_url):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    clients = [Client(app_url, verbose=False) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(clients[seed % 4].predict, seed, api_name="/generate") for seed in range(20)]
        results = [future.result(timeout=120) for future in futures]
    assert all(Image.open(image).size == (32, 32) and caption for image, caption in results)
    # Drawn in batches, each seed still gets its own caption: the same as when it is asked alone.
    assert results[7][1] == client.predict(7, api_name="/generate")[1]


def test_an_oversize_upload_is_refused(client, tmp_path):
    from gradio_client import handle_file

    (tmp_path / "huge.png").write_bytes(b"\0" * (11 * 1024 * 1024))
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        client.predict(handle_file(str(tmp_path / "huge.png")), api_name="/caption")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)."
)
def test_clicking_generate_shows_an_engraving_and_its_caption(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(app_url)
        page.get_by_role("button", name="Generate", exact=True).first.click()
        page.wait_for_function("document.querySelector('#caption textarea')?.value.length > 0", timeout=60_000)
        page.wait_for_function("document.querySelector('#engraving img')?.naturalWidth > 0", timeout=60_000)
        caption = page.locator("#caption textarea").input_value()
        screenshot = tmp_path / "app.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert caption
    assert Image.open(screenshot).size[0] >= 1100


def test_an_adapter_id_that_is_not_an_adapter_stops_with_one_sentence(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MODEL_ID", str(tiny_model_dir))
    monkeypatch.setenv("ADAPTER_ID", str(tiny_model_dir))  # a model folder, not a LoRA adapter
    with pytest.raises(SystemExit) as error:
        app.main(prevent_thread_lock=True, quiet=True)
    message = str(error.value)
    assert "Could not load a LoRA adapter" in message and "ADAPTER_ID" in message and "Traceback" not in message
