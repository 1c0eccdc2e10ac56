"""Lambda entry for POST /clip/compare: the model loads here, at init, once per container."""

from clip_serverless.aws_lambda.entry import handler_for

handler = handler_for("compare")
