# Container-image flavour (template.image.yaml): the same package and pinned dependencies as the zip
# layers, with a whole fp32 model directory (both towers) in the image. Lambda allows 10 GB per image,
# so nothing is slimmed or fetched at init. One image serves all three functions; each function's
# ImageConfig.Command names its handler (functions/<endpoint>/app.handler).
#
#   sam build --config-env image     # needs Docker; MODEL_DIR is set in template.image.yaml
#   docker build --build-arg MODEL_DIR=build/models/ViT-B-32 -t clip-serverless .
FROM public.ecr.aws/lambda/python:3.12

# An fp32 model directory exported with `python -m clip_export pretrained --arch ViT-B-32 --out build/models/ViT-B-32`.
ARG MODEL_DIR=build/models/ViT-B-32

# Pinned, --no-deps: the same set as the compare function's layer (no Hugging Face Hub client, no
# protobuf); boto3 comes with the base image. pip writes .pyc files, which an image keeps.
COPY layers/deps/requirements-*.txt /tmp/requirements/
RUN pip install --no-cache-dir --no-deps --only-binary=:all: -r /tmp/requirements/requirements-all.txt \
        --target "${LAMBDA_TASK_ROOT}" \
    && rm -rf /tmp/requirements

COPY layers/core/clip_serverless ${LAMBDA_TASK_ROOT}/clip_serverless
COPY functions ${LAMBDA_TASK_ROOT}/functions
COPY ${MODEL_DIR} /opt/model

ENV CLIP_MODEL_DIR=/opt/model
CMD ["functions/embed_text/app.handler"]
