"""An S3-protocol server on 127.0.0.1 (moto's server mode), for benches and tests.

Clients find it the way a user's would: through the environment. While the
server is open, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... point at it in
``os.environ``, so subprocesses and Ray workers started meanwhile inherit them;
closing it restores the previous values. Needs ``moto[server]`` (the ``dev`` extra).

Example::

    with LocalS3() as s3:
        uri = s3.bucket("results")            # "s3://results"
        run_experiment(cfg, f"{uri}/run")
"""

from __future__ import annotations

import os
from typing import Any

from pf2lora_ray.validate import UsageError


class LocalS3:
    """moto's S3 server on a free port of 127.0.0.1, with the AWS_* environment set."""

    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as err:
            raise UsageError("an S3 server needs moto[server] (pip install -e '.[dev]')") from err
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "local-test",
            "AWS_SECRET_ACCESS_KEY": "local-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe offline
        }
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def bucket(self, name: str) -> str:
        """Create bucket ``name``; returns its URI ``s3://<name>``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def close(self) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.server.stop()

    def __enter__(self) -> LocalS3:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
