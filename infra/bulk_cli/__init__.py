"""Start and watch bulk embedding jobs: on the deployed stack (``make bulk``) or on this machine
(``make bulk-local``), where the template's own state machine runs in moto's Step Functions interpreter with
the bulk functions served in this process. The job's code is ``clip_serverless.bulk``; this package only
drives it.
"""
