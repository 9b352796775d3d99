#!/usr/bin/env python3
"""IAM and KMS fixtures for tests/keys_kms_iam.rs, made in a moto_server started with
INITIAL_NO_AUTH_ACTION_COUNT=N (moto checks signatures and IAM policies after its first N
calls).

Usage: aws_iam_setup.py ENDPOINT N OUT.json

Makes exactly N calls with throwaway root credentials (while moto does not check them yet),
then proves that enforcement is on (the root credentials are refused), and writes the users'
access keys and ARNs and the key ARNs to OUT.json. Fails when N is not the number of calls
it made, so the Rust test and this script cannot drift apart.

Users (IAM identity policies with Resource "*": moto does not evaluate the Resource element
for KMS, so a narrower Resource would deny everything there):
  admin      kms:*                                        (test bookkeeping only)
  no-gen     kms:DescribeKey, kms:Decrypt                 (lacks kms:GenerateDataKey)
  no-decrypt kms:DescribeKey, kms:GenerateDataKey         (lacks kms:Decrypt)
  full       kms:DescribeKey, kms:GenerateDataKey, kms:Decrypt
Keys: "open" (default key policy) and "policed" (default policy; the test replaces it with a
key policy that denies the full user).
"""

import json
import sys

import boto3
import botocore.exceptions

endpoint, expected_calls, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
region = "us-east-1"
root = dict(
    endpoint_url=endpoint,
    region_name=region,
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)
iam = boto3.client("iam", **root)
kms = boto3.client("kms", **root)
calls = 0


def call(fn, **kwargs):
    global calls
    calls += 1
    return fn(**kwargs)


USERS = {
    "admin": ["kms:*"],
    "no-gen": ["kms:DescribeKey", "kms:Decrypt"],
    "no-decrypt": ["kms:DescribeKey", "kms:GenerateDataKey"],
    "full": ["kms:DescribeKey", "kms:GenerateDataKey", "kms:Decrypt"],
}

out = {"users": {}, "keys": {}}
for name, actions in USERS.items():
    user = call(iam.create_user, UserName=f"cv-{name}")["User"]
    key = call(iam.create_access_key, UserName=f"cv-{name}")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
    }
    call(
        iam.put_user_policy,
        UserName=f"cv-{name}",
        PolicyName="cryptvol-test",
        PolicyDocument=json.dumps(policy),
    )
    out["users"][name] = {
        "arn": user["Arn"],
        "access_key_id": key["AccessKeyId"],
        "secret_access_key": key["SecretAccessKey"],
    }
for name in ("open", "policed"):
    meta = call(kms.create_key, Description=f"cryptvol IAM test key {name}")["KeyMetadata"]
    out["keys"][name] = meta["Arn"]

if calls != expected_calls:
    sys.exit(f"aws_iam_setup.py made {calls} setup calls, the test expects {expected_calls}")

# Enforcement is on now: the root credentials are not an IAM user's access key.
try:
    kms.list_keys()
    sys.exit("moto still accepts unauthenticated calls: INITIAL_NO_AUTH_ACTION_COUNT not in effect")
except botocore.exceptions.ClientError as e:
    # moto answers IAM refusals of JSON services with an XML body that botocore does not
    # parse; the code is in the text.
    if "InvalidClientTokenId" not in str(e):
        sys.exit(f"unexpected refusal of the root credentials: {e}")

with open(out_path, "w") as f:
    json.dump(out, f)
