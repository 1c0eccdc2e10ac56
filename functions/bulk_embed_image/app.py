"""Lambda entry of a bulk job's image shards (the Distributed Map's children): the image tower loads at init."""

from clip_serverless.bulk.handlers import embed_handler

handler = embed_handler("image")
