"""A real S3 API on 127.0.0.1 (moto's server mode), so `dvc push`/`dvc pull` are tested against an S3 remote offline."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.request import Request, urlopen

import boto3
from moto.server import ThreadedMotoServer

# moto accepts any credentials; these are what the AWS SDKs read from the environment, as in CI.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # boto3 >= 1.36 adds CRC checksums by default, which several S3-compatible stores reject (DVC issue 10695).
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def object_keys(self) -> list[str]:
        """Every key in the bucket, to check what a push uploaded."""
        client = _client(self.endpoint_url)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def restart_empty(self) -> None:
        """Lose every object and bucket, as a restart of moto (state in memory) does, then recreate the empty bucket."""
        with urlopen(Request(f"{self.endpoint_url}/moto-api/reset", method="POST"), timeout=10):  # noqa: S310 (127.0.0.1)
            pass
        _client(self.endpoint_url).create_bucket(Bucket=self.bucket)


def _client(endpoint_url: str):  # noqa: ANN202 (boto3's client type is generated at runtime)
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
    )


@contextmanager
def s3_server(bucket: str) -> Iterator[S3Server]:
    """Serve S3 on a free port of 127.0.0.1 with an empty `bucket`; stopped on exit."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint_url = f"http://{host}:{port}"
        _client(endpoint_url).create_bucket(Bucket=bucket)
        yield S3Server(endpoint_url, bucket)
    finally:
        server.stop()
