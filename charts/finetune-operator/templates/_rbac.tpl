{{/*
The operator's permissions, rule by rule, each with the call that needs it. Least
privilege: only verbs the operator (its code in operator/finetune_operator/ and the kopf
framework under it) actually uses; no wildcards. tests/chart/test_rbac.py compares these
rules with the API calls recorded while the operator runs.
*/}}

{{/* Rules on namespaced objects: in the ClusterRole (mode cluster) or in each Role (mode namespaced). */}}
{{- define "finetune-operator.rules.namespaced" -}}
# kopf lists and watches FineTuneJobs and patches them (its finalizer, its handler progress
# and diff-base annotations; main.py configure_kopf); the operator deletes a finished
# job whose spec.runPolicy.ttlSecondsAfterFinished ran out (kube.py delete_job).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["list", "watch", "patch", "delete"]
# status is a subresource of the CRD: the operator merge-patches phase, conditions and
# progress there (kube.py patch_job_status).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# The RayCluster is adopted (kopf.adopt: an owner reference with
# blockOwnerDeletion: true). Clusters that enforce OwnerReferencesPermissionEnforcement (e.g.
# OpenShift) allow that only to whom may update the owner's finalizers. An admission check,
# not an API call: the recorded-calls comparison allow-lists it.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# One RayCluster per job (kube.py): list/watch (labelled finetune.dev/job) so KubeRay's
# state reaches the job at once (main.watch_cluster, an informer), get until the watch has
# reported, create from the job, delete on suspend, retry, clean-up and job deletion.
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "list", "watch", "create", "delete"]
# get: the job's S3 credentials Secret (spec.s3.secretRef) must exist with its keys before a
# cluster starts, and the Ray auth token is read from the Secret KubeRay generates for each
# RayCluster. No create: the operator makes no Secrets. No list/watch: it never enumerates them.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# create: Events on the FineTuneJob, the operator's phase changes (kube.py post_event) and
# kopf's handler errors (posting level ERROR). list: a RayCluster KubeRay never reports on is
# one it refused (its validation says why only in an Event on the RayCluster), read by
# field selector while such a cluster does not come up (reconcile.observe_blocked).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
# list (by label ray.io/cluster): the pods of a RayCluster that does not come up, whose
# PodScheduled condition carries the scheduler's reason (Unschedulable: no node of the pool,
# not enough GPUs) into the job's status. Only while the cluster is not ready; no get, watch
# or any write: the operator never touches pods.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- if and .Values.peering.enabled (not (include "finetune-operator.clusterwide" .)) }}
# kopf peering in namespaced mode: each replica watches the KopfPeering of every watched
# namespace and patches its own keep-alive entry into it.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* Rules on cluster-scoped objects: only in mode cluster. */}}
{{- define "finetune-operator.rules.cluster" -}}
# kopf watches CustomResourceDefinitions to notice resources (ray.io, finetune.dev) that
# appear or go after it started. (In mode namespaced kopf falls back to its start-up scan.)
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.peering.enabled }}
# kopf peering in cluster mode: each replica watches the ClusterKopfPeering and patches its
# own keep-alive entry into it; the highest priority alive replica is the active one.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
