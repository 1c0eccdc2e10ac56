"""Lambda entry of a bulk job's caption shards (the Distributed Map's children): the text tower loads at init."""

from clip_serverless.bulk.handlers import embed_handler

handler = embed_handler("text")
