"""The project's own checkov checks for infra/ (loaded with --external-checks-dir).

Checkov's built-in Bicep checks cover storage, Key Vault, the plan and the site, so its JSON names
only those resource types; these two checks cover the rest of what the template creates.
"""

from __future__ import annotations

from typing import Any

from checkov.bicep.checks.resource.base_resource_check import BaseResourceCheck
from checkov.common.models.enums import CheckCategories, CheckResult


def unwrap(conf: dict[str, Any]) -> dict[str, Any]:
    """A conditional resource (`= if (...) {...}`) comes as {condition, config}."""
    inner = conf.get("config")
    return inner if "condition" in conf and isinstance(inner, dict) else conf


TAGGED = (
    "Microsoft.ManagedIdentity/userAssignedIdentities",
    "Microsoft.Storage/storageAccounts",
    "Microsoft.OperationalInsights/workspaces",
    "Microsoft.Insights/components",
    "Microsoft.KeyVault/vaults",
    "Microsoft.Web/serverfarms",
    "Microsoft.Web/sites",
    "Microsoft.Insights/actionGroups",
    "Microsoft.Insights/scheduledQueryRules",
)


class AzdEnvironmentTag(BaseResourceCheck):
    """Every taggable resource carries the azd environment's tags (azd down and cost reports find them)."""

    def __init__(self) -> None:
        super().__init__(
            name="Resource carries the azd environment tags",
            id="CKV_QA_1",
            categories=(CheckCategories.CONVENTION,),
            supported_resources=TAGGED,
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        self.evaluated_keys = ["tags"]
        conf = unwrap(conf)
        return CheckResult.PASSED if conf.get("tags") else CheckResult.FAILED


class RoleAssignmentByDefinitionId(BaseResourceCheck):
    """A role assignment names a built-in role by definition id and says what kind of principal it is."""

    def __init__(self) -> None:
        super().__init__(
            name="Role assignment uses a role definition id and a principalType",
            id="CKV_QA_2",
            categories=(CheckCategories.IAM,),
            supported_resources=("Microsoft.Authorization/roleAssignments",),
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        self.evaluated_keys = ["properties/roleDefinitionId", "properties/principalType"]
        properties = unwrap(conf).get("properties") or {}
        definition = str(properties.get("roleDefinitionId", ""))
        if "roleDefinitions" in definition and properties.get("principalType"):
            return CheckResult.PASSED
        return CheckResult.FAILED


AzdEnvironmentTag()
RoleAssignmentByDefinitionId()
