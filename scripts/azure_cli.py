"""The Azure CLI as the deployment hooks and the smoke check call it: in the subscription azd
deployed to, and with each failure sorted into "a retry cannot help" (signed out, another tenant
or subscription, no such resource, no permission: stop at once, say what to do) and "the new
deployment is still propagating" (a role assignment not applied yet, a new account's name not
resolvable yet: worth a retry).

Standard library only; Python 3.9 or newer, like every script the hooks run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

SIGNED_OUT = re.compile(
    r"az login|AADSTS\d+|refresh token (has|is) expired|interactive authentication is needed|no subscriptions? found", re.IGNORECASE
)
ELSEWHERE = re.compile(
    r"SubscriptionNotFound|subscription '?[\w-]*'? (could not be found|not found|doesn't exist)|InvalidAuthenticationTokenTenant"
    r"|wrong issuer|Issuer validation failed|ResourceGroupNotFound|ResourceNotFound|AuthorizationFailed\b",
    re.IGNORECASE,
)
PROPAGATING = re.compile(
    r"AuthorizationPermissionMismatch|Name or service not known|nodename nor servname|getaddrinfo failed"
    r"|Temporary failure in name resolution|Failed to resolve",
    re.IGNORECASE,
)


def subscription_args(env: Mapping[str, str] | None = None) -> list[str]:
    """``--subscription ID`` of the deployment (azd gives hooks ``AZURE_SUBSCRIPTION_ID``), so that
    another default subscription in ``az`` does not matter; none when it is unknown."""
    subscription = (os.environ if env is None else env).get("AZURE_SUBSCRIPTION_ID", "").strip()
    return ["--subscription", subscription] if subscription else []


def last_line(stderr: str) -> str:
    """The line of ``az``'s error output that says what failed."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return (lines or ["no error output"])[-1][:300]


def cannot_succeed(stderr: str, env: Mapping[str, str] | None = None) -> str | None:
    """What to do when waiting cannot fix the failure ``stderr`` describes; ``None`` otherwise."""
    env = os.environ if env is None else env
    tenant = env.get("AZURE_TENANT_ID", "").strip()
    if SIGNED_OUT.search(stderr):
        return f"sign in to the deployment's tenant: az login{' --tenant ' + tenant if tenant else ''}, then run this again"
    if ELSEWHERE.search(stderr):
        subscription = env.get("AZURE_SUBSCRIPTION_ID", "").strip() or "the one azd deployed to (azd env get-value AZURE_SUBSCRIPTION_ID)"
        return (
            f"az is signed in to another tenant or subscription, or without the role this needs: "
            f"az login{' --tenant ' + tenant if tenant else ''}; subscription {subscription}"
        )
    return None


def propagating(stderr: str) -> bool:
    """Whether ``stderr`` is what a deployment minutes old answers while it propagates (a new role
    assignment, a new account's DNS name), which a retry a little later fixes."""
    return bool(PROPAGATING.search(stderr))
