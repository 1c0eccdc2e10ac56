"""Lambda entry for POST /clip/embed_text: the model loads here, at init, once per container."""

from clip_serverless.aws_lambda.entry import handler_for

handler = handler_for("embed_text")
