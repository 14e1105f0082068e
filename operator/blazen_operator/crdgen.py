"""Generate the BlazenPeer and BlazenFleet CustomResourceDefinitions from the pydantic models.

    python -m blazen_operator.crdgen > crds/blazenpeers.yaml
    python -m blazen_operator.crdgen --fleet > crds/blazenfleets.yaml
    python -m blazen_operator.crdgen --reference > docs/crd-reference.md

The committed files must equal this output (tests/unit/test_operator_crd.py checks it), so the schema
and the models cannot drift.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from . import fleet_spec as fs
from . import spec as s

# Keys a structural OpenAPI v3 schema in a CRD may carry (we keep only these).
_KEEP = {
    "type",
    "description",
    "default",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


class _K8sSchema(GenerateJsonSchema):
    """Emit defaults for default_factory fields too (the dumped model for objects, [] for lists), so the
    API server defaults nested fields the same way pydantic does."""

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None:
            value = factory()
            if isinstance(value, BaseModel):
                # the full default object: the API server validates defaults (and CEL rules) as given,
                # without defaulting inside them
                return value.model_dump(by_alias=True, exclude_none=True, mode="json")
            if isinstance(value, list):
                return [
                    v.model_dump(by_alias=True, exclude_none=True, mode="json")
                    if isinstance(v, BaseModel)
                    else v
                    for v in value
                ]
            return value
        return super().get_default_value(schema)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = dict(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        target.update(node)  # the field's own description/default win over the model's docstring
        node = target
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = dict(node.pop("allOf")[0])
        inner.update(node)
        node = inner
    if node.get("x-kubernetes-int-or-string"):
        int_or_string: dict[str, Any] = {"x-kubernetes-int-or-string": True}
        for key in ("description", "default"):
            if node.get(key) is not None:  # a None default is "unset", never a null default
                int_or_string[key] = node[key]
        return int_or_string
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            merged = {k: v for b in branches for k, v in b.items()}
            if not merged.get("x-kubernetes-int-or-string"):
                raise ValueError(f"cannot express union in a structural schema: {branches}")
            branches = [merged]
        inner = dict(branches[0])
        inner.update(node)
        return _resolve(inner, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if node.get("default", 0) is None:
        del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {name: _resolve(v, defs) for name, v in value.items()}
        elif key in ("items",):
            out[key] = _resolve(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out[key] = _resolve(value, defs)
            # `true`, `{}` (free-form) and `false` (extra=forbid) are not structural; pruning covers them
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_K8sSchema)
    defs = raw.pop("$defs", {})
    return _resolve(raw, defs)


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Ready condition",
    },
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "description": "Desired pods"},
    {
        "name": "Available",
        "type": "integer",
        "jsonPath": ".status.readyReplicas",
        "description": "Ready pods",
    },
    {"name": "GPU", "type": "integer", "jsonPath": ".spec.hardware.gpu", "description": "GPUs per pod"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {
        "name": "Endpoint",
        "type": "string",
        "jsonPath": ".status.endpoints.grpc",
        "description": "gRPC endpoint",
    },
    {
        "name": "Cert-Expiry",
        # not `date`: kubectl prints a date column as an age, and a time in the future as <invalid>
        "type": "string",
        "jsonPath": ".status.certificate.notAfter",
        "description": "Serving certificate expiry",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


FLEET_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Ready condition",
    },
    {
        "name": "Routable",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Routable")].status',
        "description": "Routable condition",
    },
    {"name": "Pools", "type": "string", "jsonPath": ".status.readyPools", "description": "Ready/all pools"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {
        "name": "Endpoint",
        "type": "string",
        "jsonPath": ".status.endpoints.grpc",
        "description": "The router's gRPC endpoint",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    description: str,
    validations: list[dict[str, str]],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    subresources: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    root = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "x-kubernetes-validations": validations,
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": model_schema(spec_model),
            "status": model_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{s.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "blazen-fleet"},
        },
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": ["blazen"],
            },
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def build_crd() -> dict[str, Any]:
    return _crd(
        kind=s.KIND,
        plural=s.PLURAL,
        singular=s.SINGULAR,
        short_names=s.SHORT_NAMES,
        description="BlazenPeer runs a fleet of Blazen peer pods: a Deployment of `blazen-peer serve`, "
        "its "
        "Services, cert-manager certificates, RBAC and disruption budget, all owned by this object.",
        validations=[
            {
                "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && "
                "size(self.metadata.name) <= 52",
                "message": "metadata.name must be a DNS-1035 label of at most 52 characters: "
                "it names Services "
                "(<name>-peers) and Secrets (<name>-client-tls)",
                "reason": "FieldValueInvalid",
            }
        ],
        spec_model=s.BlazenPeerSpec,
        status_model=s.BlazenPeerStatus,
        subresources={
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
        columns=PRINTER_COLUMNS,
    )


def build_fleet_crd() -> dict[str, Any]:
    return _crd(
        kind=fs.KIND,
        plural=fs.PLURAL,
        singular=fs.SINGULAR,
        short_names=fs.SHORT_NAMES,
        description="BlazenFleet runs pools of Blazen peers behind one router endpoint: a BlazenPeer "
        "<fleet>-<pool> per pool, and the router's Deployment, Service <fleet>, certificate, RBAC, "
        "disruption budget and NetworkPolicy, all owned by this object.",
        validations=[
            {
                "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && "
                f"size(self.metadata.name) <= {fs.MAX_PEER_NAME - 2}",
                "message": "metadata.name must be a DNS-1035 label of at most "
                f"{fs.MAX_PEER_NAME - 2} characters: it names the Service and the pools' BlazenPeers",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": f"self.spec.pools.all(p, size(self.metadata.name) + 1 + size(p.name) <= "
                f"{fs.MAX_PEER_NAME})",
                "message": "spec.pools[].name: <fleet>-<pool> names a BlazenPeer and must be at most "
                f"{fs.MAX_PEER_NAME} characters",
                "fieldPath": ".spec.pools",
                "reason": "FieldValueInvalid",
            },
        ],
        spec_model=fs.BlazenFleetSpec,
        status_model=fs.BlazenFleetStatus,
        subresources={"status": {}},
        columns=FLEET_PRINTER_COLUMNS,
    )


def _header(flag: str, source: str) -> str:
    return f"# Generated by `python -m blazen_operator.crdgen{flag}`; do not edit. Source: {source}\n"


def render(kind: str = "peer") -> str:
    _, build, header = FILES[kind]
    # "---": helm concatenates the chart's crds/ files (helm show crds), so each must start a document
    return header + "---\n" + yaml.safe_dump(build(), sort_keys=False, width=120)


def _rows(node: dict[str, Any], path: str, rows: list[tuple[str, str, str, str]]) -> None:
    for name, child in (node.get("properties") or {}).items():
        p = f"{path}.{name}"
        kind = child.get("type", "int-or-string" if child.get("x-kubernetes-int-or-string") else "object")
        if kind == "array":
            item = child.get("items") or {}
            kind = f"[]{item.get('type', 'object')}"
        elif kind == "object" and isinstance(child.get("additionalProperties"), dict):
            kind = "map"
        if "enum" in child:
            kind += " (" + ", ".join(str(v) for v in child["enum"]) + ")"
        default = "" if "default" not in child else f"`{json.dumps(child['default'], separators=(',', ':'))}`"
        rows.append((p, kind, default, " ".join(str(child.get("description", "")).split())))
        if child.get("type") == "object":
            _rows(child, p, rows)
        elif child.get("type") == "array" and isinstance(child.get("items"), dict):
            _rows(child["items"], f"{p}[]", rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _reference(crd: dict[str, Any], title: str, intro: str, level: str) -> list[str]:
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    lines = [f"{level} {title}", "", intro, ""]
    for section in ("spec", "status"):
        rows: list[tuple[str, str, str, str]] = []
        _rows({"properties": {section: root["properties"][section]}}, "", rows)
        lines += [f"{level}# {section}", "", "| field | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{p}` | {k} | {d} | {_cell(desc)} |" for p, k, d, desc in rows[1:]]
        lines.append("")
    lines += [f"{level}# Validation rules (CEL)", "", "| where | rule | message |", "|---|---|---|"]

    def walk(node: dict[str, Any], path: str) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            lines.append(f"| `{path or '.'}` | `{_cell(rule['rule'])}` | {_cell(rule['message'])} |")
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(root, "")
    lines += ["", f"{level}# Printer columns", "", "| column | JSONPath |", "|---|---|"]
    lines += [f"| {c['name']} | `{c['jsonPath']}` |" for c in version["additionalPrinterColumns"]]
    return lines


def render_reference() -> str:
    """docs/crd-reference.md from the same schemas (`python -m blazen_operator.crdgen --reference`)."""
    peer, fleet = build_crd(), build_fleet_crd()
    version = peer["spec"]["versions"][0]["name"]
    lines = _reference(
        peer,
        "BlazenPeer CRD reference",
        "<!-- Generated by `python -m blazen_operator.crdgen --reference`; do not edit. -->\n\n"
        f"`{peer['metadata']['name']}`, version `{version}`, kind `{s.KIND}`, short name `bp`, "
        "namespaced. "
        "Subresources: `status`, `scale` (`.spec.replicas` / `.status.replicas` / `.status.selector`). "
        "`kubectl explain blazenpeer.spec` shows the same descriptions.",
        "#",
    )
    lines += [""]
    lines += _reference(
        fleet,
        "BlazenFleet CRD reference",
        f"`{fleet['metadata']['name']}`, version `{version}`, kind `{fs.KIND}`, short name `bf`, namespaced. "
        "Subresources: `status`. `kubectl explain blazenfleet.spec` shows the same descriptions; "
        "docs/fleet.md explains the fleet.",
        "#",
    )
    return "\n".join(lines) + "\n"


# kind -> (committed file, builder, header)
FILES: dict[str, tuple[str, Callable[[], dict[str, Any]], str]] = {
    "peer": ("crds/blazenpeers.yaml", build_crd, _header("", "operator/blazen_operator/spec.py")),
    "fleet": (
        "crds/blazenfleets.yaml",
        build_fleet_crd,
        _header(" --fleet", "operator/blazen_operator/fleet_spec.py"),
    ),
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--reference" in args:
        sys.stdout.write(render_reference())
    else:
        sys.stdout.write(render("fleet" if "--fleet" in args else "peer"))


if __name__ == "__main__":
    main()
