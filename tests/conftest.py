"""Shared fixtures: one local Ray per session and a real S3-compatible server (moto) on 127.0.0.1.

Ray starts after the S3 variables are set, so its workers inherit them, as the workers of a cluster whose nodes were
started with credentials in their environment: the code under test never hands a worker a secret."""

from __future__ import annotations

import os
import uuid

import boto3
import pytest

from tests.helpers import free_port


@pytest.fixture(scope="session")
def ray_start_2_cpus(s3_server):
    import ray

    # the dashboard serves the state API, which Ray Train's placement-group cleaner polls
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; the AWS variables point every client (pyarrow, boto3) at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket; returns its ``s3://`` URI."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
