"""Lambda entry for POST /v1/embeddings and GET /v1/models (OpenAI's embeddings API): the text tower loads here,
at init, once per container; image vectors come from the embed_image function (Lambda Invoke)."""

from clip_serverless.aws_lambda.entry import handler_for

handler = handler_for("embeddings")
