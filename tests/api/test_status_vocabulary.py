"""One status vocabulary (finetune_api.status): the CRD, the docs and the code agree on it.

Fails when the CRD or a document names a phase, condition type or reason the code does not
have, when the operator sets a word that is not in the vocabulary, and when the vocabulary
(hence the generated spec reference) lists a word that no code sets.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from finetune_api.crd import CRD_FILE_NAME
from finetune_api.schema import Schema, openapi_schema
from finetune_api.status import EXITS, ConditionType, Phase, Reason

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "finetune_operator"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VOCABULARY = set(Phase.words()) | set(ConditionType.words()) | set(Reason.words())

# CamelCase words the docs may name that are not the job's status vocabulary nor values of
# its schema: Kubernetes and Ray kinds and settings.
OTHER_NAMES = {
    "FineTuneJob", "RayCluster", "TorchTrainer",            # kinds and classes
    "KopfPeering", "ClusterKopfPeering",                    # kopf's peering resources
    "OwnerReferencesPermissionEnforcement",                 # an admission plugin
    "Recreate", "RuntimeDefault",                           # Deployment strategy, seccomp
    "CamelCase",                                            # the word, in the CRD's text
    "HeadPodReady", "RayClusterProvisioned",                # KubeRay's RayCluster conditions
    "RayClusterPodsProvisioning",                           # ... and one of their reasons
    "Unschedulable",                                        # the scheduler's PodScheduled reason
    "CreateContainerConfigError", "ContainersNotReady",     # the kubelet's container reasons
    "TensorBoard",                                          # where the metrics go
    "ReplicaFailure", "FailedCreateHeadPod", "FailedCreateWorkerPod",
    "InvalidRayClusterSpec", "InvalidRayClusterMetadata",   # KubeRay's Event reasons
    "PodScheduled", "FailedScheduling",                     # the scheduler's words
    "PriorityClass",                                        # a Kubernetes kind
}


def schema_enum_values(schema: Schema) -> set[str]:
    out = {v for v in schema.get("enum", []) if isinstance(v, str)}
    for child in (schema.get("properties") or {}).values():
        out |= schema_enum_values(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out |= schema_enum_values(schema[key])
    return out


def crd_status() -> Schema:
    crd = yaml.safe_load((ROOT / "crds" / CRD_FILE_NAME).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def descriptions(schema: Schema) -> list[str]:
    out = [schema["description"]] if "description" in schema else []
    for child in (schema.get("properties") or {}).values():
        out += descriptions(child)
    if isinstance(schema.get("items"), dict):
        out += descriptions(schema["items"])
    return out


def test_the_crd_phases_are_the_vocabulary():
    assert crd_status()["properties"]["phase"]["enum"] == list(Phase.words())


def test_the_crd_names_exactly_the_condition_types():
    text = crd_status()["properties"]["conditions"]["items"]["properties"]["type"]["description"]
    named = re.findall(r"\b[A-Z][A-Za-z]+\b", text)
    assert [w for w in named if w != "One"] == list(ConditionType.words()), text


def test_the_crd_names_no_status_word_the_code_lacks():
    camel = re.compile(r"\b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b")  # two humps or more
    unknown = {w for text in descriptions(crd_status()) for w in camel.findall(text)
               if w not in VOCABULARY | OTHER_NAMES}
    assert not unknown, f"the CRD's status text names {sorted(unknown)}"


def test_the_docs_name_no_status_word_the_code_lacks():
    known = VOCABULARY | schema_enum_values(openapi_schema()) | OTHER_NAMES
    word = re.compile(r"`([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)`")
    unknown = {}
    for doc in DOCS:
        prose = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
        for w in word.findall(prose):
            if w not in known:
                unknown.setdefault(w, doc.name)
    assert not unknown, f"words the code does not have (word: document): {unknown}"


def vocabulary_used_by_the_operator() -> dict[str, set[str]]:
    """Phase.X, ConditionType.X (as Cond.X) and Reason.X as the operator's source spells them."""
    classes = {"Phase": Phase, "Cond": ConditionType, "ConditionType": ConditionType,
               "Reason": Reason}
    used: dict[str, set[str]] = {"Phase": set(), "ConditionType": set(), "Reason": set()}
    for path in OPERATOR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in classes and node.attr.isupper():
                cls = classes[node.value.id]
                assert hasattr(cls, node.attr), f"{path.name}: {node.value.id}.{node.attr}"
                used[cls.__name__].add(getattr(cls, node.attr))
    return used


def test_every_word_of_the_vocabulary_is_used_by_the_code():
    """What the spec reference lists (generated from the vocabulary) is what the code sets."""
    used = vocabulary_used_by_the_operator()
    # The trainer's `failed` reasons come through its exit codes (finetune_api.status.Exit).
    trainer = {e.reason for e in EXITS.values() if e.reason}
    assert set(Reason.words()) - used["Reason"] - trainer == set()
    assert set(ConditionType.words()) - used["ConditionType"] == set()
    assert set(Phase.words()) - used["Phase"] == set()


def test_the_operator_spells_no_status_word_itself():
    """Conditions and Events take their type and reason from the vocabulary, never a literal."""
    literals = []
    for path in OPERATOR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("Condition", "Event"):
                args = node.args[:3] if node.func.id == "Condition" else node.args[1:2]
                args += [k.value for k in node.keywords if k.arg in ("type", "reason")]
                literals += [f"{path.name}:{node.lineno}" for a in args
                             if isinstance(a, ast.Constant) and a.value in VOCABULARY]
    assert not literals, literals


def test_only_the_failing_exit_codes_that_retry_cannot_fix_are_final():
    assert {c for c, e in EXITS.items() if not e.retryable} == {2, 3}
    assert all(e.reason in Reason.words() for e in EXITS.values() if e.reason)
