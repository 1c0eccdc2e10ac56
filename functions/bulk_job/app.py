"""Lambda entry of the bulk job's plan and finish steps (Step Functions): the core layer alone, no model."""

from clip_serverless.bulk.handlers import job_handler

handler = job_handler()
