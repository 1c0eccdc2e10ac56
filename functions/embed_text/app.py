"""Lambda entry for POST /clip/embed_text: the model loads here, at init, once per container."""

from clip_serverless.api.lambda_entry import handler_for

handler = handler_for("embed_text")
