# The Engraving demo (app.py) on CPU.
#   docker build -t engraving .
#   docker run -p 7860:7860 -e MODEL_ID=your-name/engraving engraving                  # a Hub model
#   docker run -p 7860:7860 -v "$PWD/outputs/demo/model:/model:ro" -e MODEL_ID=/model engraving   # a local one
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HOME=/home/user/.cache/huggingface

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# torch and torchvision from the CPU index first: the default Linux wheels bundle CUDA (several GB). The pins in
# requirements.txt are then already met (2.14.1+cpu satisfies ==2.14.1), and pip installs the rest.
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
    && pip install -r requirements.txt

COPY --chown=user *.py ./
USER user
EXPOSE 7860
CMD ["python", "app.py"]
