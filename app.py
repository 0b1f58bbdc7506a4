"""
Gradio demo of an Engraving model: engravings and captions from seeds, batches, walks between seeds, drawings of a
caption, and captions of an uploaded picture.

    MODEL_ID=outputs/demo/model python app.py      # a folder written by train.py
    MODEL_ID=your-name/engraving python app.py     # or a Hub model id
    MODEL_ID=outputs/demo/model ADAPTER_ID=outputs/lora/model python app.py   # with a LoRA adapter of it

The model loads once at start. Requests queue and run one at a time, except that waiting one-seed requests are drawn
together, up to MAX_BATCH_SIZE in one pass (Gradio's batching); beyond QUEUE_MAX_SIZE waiting requests, a request is
told at once that the queue is full.
"""

import os
import random

import gradio as gr
import torch

from pipeline_engraving import IMAGINE_VARIATION, MAX_SEED, EngravingPipeline, open_image


DEFAULT_MODEL_ID = "outputs/demo/model"
MAX_BATCH_SIZE = 16
MAX_INTERPOLATION_STEPS = 16
MAX_CAPTION_CHARACTERS = 300
MAX_UPLOAD_SIZE = "10mb"
# Requests waiting beyond this get Gradio's "queue is full, try again" at once rather than a long wait.
QUEUE_MAX_SIZE = 64
IMAGE_HEIGHT = 512
# Engravings fill their box, small ones (a 128 px model's) drawn with crisp pixels rather than blurred.
CSS = ".engraving img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


def check_seed(seed, name="Seed"):
    """The seed as an int, or a gr.Error that says which whole numbers are allowed."""
    if seed is None or seed != int(seed) or not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"{name} must be a whole number from 0 to {MAX_SEED}; got {seed}.")
    return int(seed)


def engraving_image(label, **kwargs):
    """An output box that shows an engraving large, as a PNG."""
    return gr.Image(label=label, type="pil", format="png", height=IMAGE_HEIGHT, elem_classes="engraving", **kwargs)


def generator_dtype():
    """GENERATOR_DTYPE=bfloat16 draws in bfloat16 (faster on CPUs with AMX; pixels round differently); else float32."""
    name = os.environ.get("GENERATOR_DTYPE", "float32")
    if name not in ("float32", "bfloat16"):
        raise SystemExit(f"error: GENERATOR_DTYPE must be float32 or bfloat16, not {name!r}.")
    return torch.bfloat16 if name == "bfloat16" else None


def random_seed():
    """A fresh seed for the seed box."""
    return random.randint(0, MAX_SEED)


def build_demo(pipeline):
    """The Blocks app around a loaded pipeline: one tab per way of using it, each endpoint with an `api_name`."""

    @torch.inference_mode()
    def engrave_seeds(seeds):
        # Batched by Gradio: the seeds of up to MAX_BATCH_SIZE waiting requests, drawn in one pass. Each seed was
        # checked against the box's range before it joined the batch, so no request fails another's.
        output = pipeline(seeds=[check_seed(seed) for seed in seeds], batch_size=MAX_BATCH_SIZE)
        return output.images, output.captions

    @torch.inference_mode()
    def engrave_batch(first_seed, count):
        # The sliders refuse counts outside their range before a handler runs.
        first_seed, count = check_seed(first_seed, "First seed"), round(count)
        check_seed(first_seed + count - 1, "The last seed")
        output = pipeline(seeds=range(first_seed, first_seed + count), batch_size=MAX_BATCH_SIZE)
        return list(zip(output.images, output.captions))

    @torch.inference_mode()
    def walk_between_seeds(seed_a, seed_b, steps):
        output = pipeline.interpolate(check_seed(seed_a, "Seed A"), check_seed(seed_b, "Seed B"), steps=round(steps))
        return list(zip(output.images, output.captions))

    @torch.inference_mode()
    def draw_caption(caption, seed, variation):
        caption = (caption or "").strip()
        if not caption or len(caption) > MAX_CAPTION_CHARACTERS:
            raise gr.Error(f"Write a caption of 1 to {MAX_CAPTION_CHARACTERS} characters.")
        return pipeline.imagine(caption, seed=check_seed(seed), variation=float(variation)).images[0]

    def caption_picture(path):
        if path is None:
            raise gr.Error("Upload a picture first.")
        try:
            picture = open_image(path)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        output = pipeline.engrave([picture])
        return output.captions[0], output.images[0]

    with gr.Blocks(title="Engraving") as demo:
        gr.Markdown(
            "# Engraving\nA compact generative model of 19th-century engravings and their captions. "
            "The same seed always gives the same engraving and caption."
        )
        with gr.Tab("Engrave a seed"):
            with gr.Row():
                seed = gr.Number(label=f"Seed (0 to {MAX_SEED})", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                randomise = gr.Button("Random seed")
                generate = gr.Button("Generate", variant="primary")
            engraving = engraving_image("Engraving", elem_id="engraving")
            caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
            randomise.click(random_seed, outputs=seed, api_name="random_seed")
            generate.click(
                engrave_seeds,
                inputs=seed,
                outputs=[engraving, caption],
                api_name="generate",
                batch=True,
                max_batch_size=MAX_BATCH_SIZE,
            )

        with gr.Tab("Batch"):
            with gr.Row():
                first_seed = gr.Number(label="First seed", value=0, precision=0)
                count = gr.Slider(1, MAX_BATCH_SIZE, value=8, step=1, label="Number of engravings")
                generate_batch = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Engravings", columns=4, format="png")
            generate_batch.click(engrave_batch, inputs=[first_seed, count], outputs=gallery, api_name="batch")

        with gr.Tab("Interpolation"):
            with gr.Row():
                seed_a = gr.Number(label="Seed A", value=0, precision=0)
                seed_b = gr.Number(label="Seed B", value=1, precision=0)
                steps = gr.Slider(2, MAX_INTERPOLATION_STEPS, value=8, step=1, label="Steps")
                walk = gr.Button("Interpolate", variant="primary")
            strip = gr.Gallery(label="From seed A to seed B", columns=8, format="png")
            walk.click(walk_between_seeds, inputs=[seed_a, seed_b, steps], outputs=strip, api_name="interpolate")

        with gr.Tab("Caption to engraving"):
            with gr.Row():
                prompt = gr.Textbox(label="Caption", value="An engraving depicting a lighthouse on a rocky coast")
                prompt_seed = gr.Number(label="Seed", value=0, precision=0)
                variation = gr.Slider(0.0, 1.0, value=IMAGINE_VARIATION, step=0.1, label="Variation between seeds")
            draw = gr.Button("Draw", variant="primary")
            drawing = engraving_image("Engraving")
            draw.click(draw_caption, inputs=[prompt, prompt_seed, variation], outputs=drawing, api_name="imagine")

        with gr.Tab("Picture to caption"):
            gr.Markdown(f"Upload a picture (PNG, JPEG, WebP or TIFF, up to {MAX_UPLOAD_SIZE[:-2]} MB).")
            with gr.Row():
                picture = gr.File(label="Picture", file_types=["image"], type="filepath")
                with gr.Column():
                    picture_caption = gr.Textbox(label="Caption", interactive=False)
                    picture_engraving = engraving_image("Redrawn as an engraving")
            read = gr.Button("Caption", variant="primary")
            read.click(
                caption_picture, inputs=picture, outputs=[picture_caption, picture_engraving], api_name="caption"
            )
    return demo


def main(**launch_kwargs):
    """
    Loads the model named by MODEL_ID (with the LoRA adapter ADAPTER_ID, if set) once, then serves the demo; keyword
    arguments go to `launch`.
    """
    model_id = os.environ.get("MODEL_ID", DEFAULT_MODEL_ID)
    try:
        pipeline = EngravingPipeline.from_pretrained(
            model_id,
            device="cuda" if torch.cuda.is_available() else "cpu",
            adapter_id=os.environ.get("ADAPTER_ID") or None,
            generator_dtype=generator_dtype(),
        )
    except ValueError as error:
        raise SystemExit(f"error: {error} Set MODEL_ID (and ADAPTER_ID) to choose the model.") from None
    demo = build_demo(pipeline)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    demo.launch(max_file_size=MAX_UPLOAD_SIZE, css=CSS, **launch_kwargs)
    return demo


if __name__ == "__main__":
    main()
