"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1 (not a client mock).

Requests go over HTTP through s3fs/aiobotocore exactly as they would to AWS, MinIO or R2; only
the endpoint differs. The endpoint and dummy credentials are given the way a user gives them,
through the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …), so child processes
(Dask workers) reach the same server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "samcache-test",
    "AWS_SECRET_ACCESS_KEY": "samcache-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    """A running server: ``endpoint_url`` and the environment that points clients at it."""

    endpoint_url: str
    env: dict[str, str]

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_credentials()).create_bucket(
            Bucket=name
        )

    def list_buckets(self) -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_credentials())
        return [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]

    def list_keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` with its size in bytes (the server's view, no cache)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url, **_boto_credentials())
        keys: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.update({obj["Key"]: int(obj["Size"]) for obj in page.get("Contents", [])})
        return keys


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def _clear_fsspec_instances() -> None:
    """fsspec caches filesystem instances by their arguments, not by the environment."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's server on a free 127.0.0.1 port and point this process's env at it.

    The previous values of the variables are restored on exit.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    _clear_fsspec_instances()
    try:
        yield S3Server(endpoint, env)
    finally:
        _clear_fsspec_instances()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
