"""The test bed's own tests: the emulator behaves like an API server where operators notice."""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from finetune_testbed.client import ApiStatusError, KubeClient, resource_path
from finetune_testbed.emulator import EmulatorThread, make_emulator
from finetune_testbed.kuberay_standin import HeadAddress, KubeRayStandIn
from finetune_testbed.paths import KUBERAY_CRD, PROJECT_CRD, REPO_ROOT
from finetune_testbed.schema_validation import AdmissionError, CrdSchemaValidator

FTJ = 'finetune.dev/v1alpha1'
needs_kuberay_crd = pytest.mark.skipif(not KUBERAY_CRD.exists(), reason=f'no KubeRay CRD at {KUBERAY_CRD}')


def job(name: str = 'job-1', namespace: str = 'default', **spec: Any) -> dict[str, Any]:
    return {'apiVersion': FTJ, 'kind': 'FineTuneJob', 'metadata': {'name': name, 'namespace': namespace},
            'spec': {'model': {'uri': 'hf://org/model'}, 'dataset': {'uri': 's3://bucket/data.jsonl'},
                     'checkpoint': {'uri': 's3://bucket/ckpt'}, **spec}}


def ray_cluster(name: str = 'rc-1', namespace: str = 'default', owner: dict[str, Any] | None = None) -> dict[str, Any]:
    container = {'name': 'ray', 'image': 'rayproject/ray:2.60.0'}
    obj = {'apiVersion': 'ray.io/v1', 'kind': 'RayCluster', 'metadata': {'name': name, 'namespace': namespace},
           'spec': {'rayVersion': '2.60.0', 'authOptions': {'mode': 'token'},
                    'headGroupSpec': {'rayStartParams': {}, 'template': {'spec': {'containers': [dict(container)]}}},
                    'workerGroupSpecs': [{'groupName': 'workers', 'replicas': 2, 'minReplicas': 2, 'maxReplicas': 2,
                                          'rayStartParams': {}, 'template': {'spec': {'containers': [dict(container)]}}}]}}
    if owner is not None:
        obj['metadata']['ownerReferences'] = [{'apiVersion': owner['apiVersion'], 'kind': owner['kind'],
                                               'name': owner['metadata']['name'], 'uid': owner['metadata']['uid'],
                                               'controller': True, 'blockOwnerDeletion': True}]
    return obj


def status_of(error: pytest.ExceptionInfo[ApiStatusError]) -> tuple[int, str, str]:
    return error.value.status, error.value.body['reason'], error.value.body['message']


# -- object metadata and status codes --

def test_create_sets_metadata_and_answers_201_then_409(kube):
    status, created = kube.request('POST', resource_path(FTJ, 'finetunejobs', 'default'), job(), expect_status=True)
    assert status == 201
    meta = created['metadata']
    assert meta['uid'] and meta['generation'] == 1 and meta['creationTimestamp'].endswith('Z')
    assert int(meta['resourceVersion']) > 0
    assert created['spec']['training']['learningRate'] == 2e-05  # CRD defaults applied
    with pytest.raises(ApiStatusError) as error:
        kube.create(job(), 'finetunejobs')
    assert status_of(error) == (409, 'AlreadyExists', 'finetunejobs.finetune.dev "job-1" already exists')


def test_missing_object_is_a_404_status(kube):
    with pytest.raises(ApiStatusError) as error:
        kube.get(FTJ, 'finetunejobs', 'nope', 'default')
    assert status_of(error) == (404, 'NotFound', 'finetunejobs.finetune.dev "nope" not found')
    assert error.value.body['kind'] == 'Status' and error.value.body['details']['name'] == 'nope'


def test_generate_name_and_monotonic_resource_versions(kube):
    first = kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'generateName': 'cm-'}}, 'configmaps', 'default')
    second = kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'generateName': 'cm-'}}, 'configmaps', 'default')
    assert first['metadata']['name'].startswith('cm-') and len(first['metadata']['name']) == 8
    assert first['metadata']['name'] != second['metadata']['name']
    assert int(second['metadata']['resourceVersion']) > int(first['metadata']['resourceVersion'])


def test_unknown_namespace_and_bad_names_are_refused(kube):
    with pytest.raises(ApiStatusError) as error:
        kube.create(job(namespace='nowhere'), 'finetunejobs')
    assert status_of(error)[:2] == (404, 'NotFound')
    with pytest.raises(ApiStatusError) as error:
        kube.create(job(name='Bad_Name'), 'finetunejobs')
    status, reason, message = status_of(error)
    assert (status, reason) == (422, 'Invalid')
    assert message.startswith('FineTuneJob.finetune.dev "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name"')


def test_generation_moves_with_spec_only_and_status_is_separate(kube):
    kube.create(job(), 'finetunejobs')
    # The main resource ignores status; /status ignores everything but status.
    updated = kube.patch(FTJ, 'finetunejobs', 'job-1', {'status': {'phase': 'Running'}, 'metadata': {'labels': {'a': 'b'}}}, 'default')
    assert 'status' not in updated and updated['metadata']['labels'] == {'a': 'b'} and updated['metadata']['generation'] == 1
    updated = kube.patch(FTJ, 'finetunejobs', 'job-1', {'status': {'phase': 'Running'}, 'spec': {'resources': {'workers': 9}}},
                         'default', subresource='status')
    assert updated['status'] == {'phase': 'Running'} and updated['spec']['resources']['workers'] == 1
    assert updated['metadata']['generation'] == 1
    updated = kube.patch(FTJ, 'finetunejobs', 'job-1', {'spec': {'resources': {'workers': 3}}}, 'default')
    assert updated['metadata']['generation'] == 2 and updated['status'] == {'phase': 'Running'}
    again = kube.patch(FTJ, 'finetunejobs', 'job-1', {'spec': {'resources': {'workers': 3}}}, 'default')
    assert again['metadata']['resourceVersion'] == updated['metadata']['resourceVersion']  # a no-op


def test_put_replaces_with_optimistic_concurrency(kube):
    created = kube.create(job(), 'finetunejobs')
    stale = copy.deepcopy(created)
    created['spec']['resources']['workers'] = 4
    replaced = kube.replace(created, 'finetunejobs')
    assert replaced['spec']['resources']['workers'] == 4 and replaced['metadata']['generation'] == 2
    with pytest.raises(ApiStatusError) as error:
        kube.replace(stale, 'finetunejobs')
    assert status_of(error)[:2] == (409, 'Conflict')
    replaced['status'] = {'phase': 'Pending'}
    assert kube.replace(replaced, 'finetunejobs', subresource='status')['status'] == {'phase': 'Pending'}
    del stale['metadata']['resourceVersion']  # custom resources refuse unconditional updates
    with pytest.raises(ApiStatusError) as error:
        kube.replace(stale, 'finetunejobs')
    assert status_of(error)[:2] == (422, 'Invalid') and 'metadata.resourceVersion' in status_of(error)[2]


def test_json_patch_test_op_failure_is_422(kube):
    created = kube.create(job(), 'finetunejobs')
    path = resource_path(FTJ, 'finetunejobs', 'default', 'job-1')
    ok = [{'op': 'test', 'path': '/metadata/resourceVersion', 'value': created['metadata']['resourceVersion']},
          {'op': 'add', 'path': '/metadata/labels', 'value': {'x': 'y'}}]
    assert kube.request('PATCH', path, ok, content_type='application/json-patch+json')['metadata']['labels'] == {'x': 'y'}
    status, body = kube.request('PATCH', path, ok, content_type='application/json-patch+json', expect_status=True)
    assert (status, body['reason']) == (422, 'Invalid')  # the resourceVersion moved on


def test_server_side_apply_creates_then_merges(kube):
    path = resource_path('v1', 'configmaps', 'default', 'applied')
    body = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'applied'}, 'data': {'a': '1'}}
    params = {'fieldManager': 'test'}
    status, created = kube.request('PATCH', path, body, params=params, content_type='application/apply-patch+yaml', expect_status=True)
    assert status == 201 and created['data'] == {'a': '1'}
    body['data'] = {'b': '2'}
    assert kube.request('PATCH', path, body, params=params, content_type='application/apply-patch+yaml')['data'] == {'a': '1', 'b': '2'}


# -- admission --

def test_invalid_job_is_refused_with_causes_like_the_api_server(kube):
    bad = job(resources={'workers': 0, 'gpusPerWorker': 0}, training={'precision': 'fp16'})
    with pytest.raises(ApiStatusError) as error:
        kube.create(bad, 'finetunejobs')
    status, reason, message = status_of(error)
    assert (status, reason) == (422, 'Invalid')
    assert message == ('FineTuneJob.finetune.dev "job-1" is invalid: spec.resources.workers: Invalid value: 0: '
                       'spec.resources.workers in body should be greater than or equal to 1')
    causes = error.value.body['details']['causes']
    assert causes == [{'reason': 'FieldValueInvalid', 'field': 'spec.resources.workers',
                       'message': 'Invalid value: 0: spec.resources.workers in body should be greater than or equal to 1'}]


def test_cel_rules_name_their_field_path(kube):
    bad = job(resources={'gpusPerWorker': 0}, training={'precision': 'fp16', 'warmupSteps': 10, 'maxSteps': 5})
    with pytest.raises(ApiStatusError) as error:
        kube.create(bad, 'finetunejobs')
    fields = {cause['field']: cause['message'] for cause in error.value.body['details']['causes']}
    assert fields == {
        'spec.training.warmupSteps': 'Invalid value: "object": warmupSteps must be smaller than maxSteps',
        'spec.training.precision': 'Invalid value: "object": precision fp16 needs GPUs (gpusPerWorker > 0); use bf16 or fp32 on CPU',
    }
    assert error.value.body['message'].startswith('FineTuneJob.finetune.dev "job-1" is invalid: [spec.')


def test_unknown_fields_are_refused_and_nulls_pruned(kube):
    with pytest.raises(ApiStatusError) as error:
        kube.create(job(bogus=1), 'finetunejobs')
    assert status_of(error) == (400, 'BadRequest', 'FineTuneJob in version "v1alpha1" cannot be handled as a '
                                                   'FineTuneJob: strict decoding error: unknown field "spec.bogus"')
    created = kube.create(job(training={'maxSteps': None, 'epochs': None}), 'finetunejobs')
    assert 'maxSteps' not in created['spec']['training'] and created['spec']['training']['epochs'] == 1
    # As asked by the client, Warn and Ignore drop unknown fields instead.
    path = resource_path(FTJ, 'finetunejobs', 'default')
    warned = kube.request('POST', path, job('job-2', bogus=1), params={'fieldValidation': 'Warn'})
    assert 'bogus' not in warned['spec']


def test_crds_created_through_the_api_are_served(kube):
    crd = {'apiVersion': 'apiextensions.k8s.io/v1', 'kind': 'CustomResourceDefinition',
           'metadata': {'name': 'widgets.example.com'},
           'spec': {'group': 'example.com', 'scope': 'Namespaced',
                    'names': {'kind': 'Widget', 'plural': 'widgets', 'singular': 'widget', 'listKind': 'WidgetList'},
                    'versions': [{'name': 'v1', 'served': True, 'storage': True, 'schema': {'openAPIV3Schema': {
                        'type': 'object', 'properties': {'spec': {'type': 'object', 'properties': {
                            'size': {'type': 'integer', 'maximum': 10}}}}}}}]}}
    kube.create(crd, 'customresourcedefinitions')
    widget = {'apiVersion': 'example.com/v1', 'kind': 'Widget', 'metadata': {'name': 'w'}, 'spec': {'size': 3}}
    assert kube.create(widget, 'widgets', 'default')['spec'] == {'size': 3}
    with pytest.raises(ApiStatusError) as error:
        kube.create({**widget, 'metadata': {'name': 'w2'}, 'spec': {'size': 11}}, 'widgets', 'default')
    assert error.value.status == 422 and 'spec.size' in error.value.body['message']


def test_updates_are_validated_too(kube):
    kube.create(job(), 'finetunejobs')
    with pytest.raises(ApiStatusError) as error:
        kube.patch(FTJ, 'finetunejobs', 'job-1', {'spec': {'strategy': {'type': 'fsdp', 'deepspeed': {'stage': 3}}}}, 'default')
    assert error.value.body['details']['causes'][0]['field'] == 'spec.strategy.deepspeed'
    with pytest.raises(ApiStatusError) as error:
        kube.patch(FTJ, 'finetunejobs', 'job-1', {'status': {'phase': 'Dancing'}}, 'default', subresource='status')
    assert error.value.body['details']['causes'][0]['reason'] == 'FieldValueNotSupported'


def test_validation_ratchets_over_an_unchanged_top_level_field():
    # As the API server's validation ratcheting: a stored spec that the schema (or a CEL rule)
    # refuses today does not block status writes; changing the spec validates all of it again.
    validator = CrdSchemaValidator.from_file(PROJECT_CRD)
    stored, _ = validator.admit(job())
    stored['spec']['resources']['workers'] = 0  # as if stored under an older, looser schema
    stored['spec']['training'].update(warmupSteps=10, maxSteps=5)  # and a CEL rule's violation
    with pytest.raises(AdmissionError):
        validator.admit(copy.deepcopy(stored))
    status_write = {**copy.deepcopy(stored), 'status': {'phase': 'Running'}}
    assert validator.admit(status_write, old=stored)[0]['status'] == {'phase': 'Running'}
    with pytest.raises(AdmissionError) as error:
        validator.admit({**copy.deepcopy(stored), 'status': {'phase': 'Dancing'}}, old=stored)
    assert [cause.field for cause in error.value.causes] == ['status.phase']
    spec_write = copy.deepcopy(status_write)
    spec_write['spec']['model']['uri'] = 'hf://org/other'
    with pytest.raises(AdmissionError) as error:
        validator.admit(spec_write, old=stored)
    assert [cause.field for cause in error.value.causes] == ['spec.resources.workers']


@needs_kuberay_crd
def test_ray_cluster_schema_is_enforced(kube):
    kube.create(ray_cluster(), 'rayclusters')
    bad = ray_cluster('rc-2')
    del bad['spec']['workerGroupSpecs'][0]['groupName']
    bad['spec']['headGroupSpec']['template']['spec']['containers'][0]['ports'] = 'http'
    with pytest.raises(ApiStatusError) as error:
        kube.create(bad, 'rayclusters')
    fields = {cause['field'] for cause in error.value.body['details']['causes']}
    assert fields == {'spec.workerGroupSpecs[0].groupName', 'spec.headGroupSpec.template.spec.containers[0].ports'}
    with pytest.raises(ApiStatusError) as error:
        kube.create({**ray_cluster('rc-3'), 'spec': {**ray_cluster()['spec'], 'headGroupSpecs': {}}}, 'rayclusters')
    assert status_of(error)[:2] == (400, 'BadRequest') and 'spec.headGroupSpecs' in status_of(error)[2]


# -- deletion --

def test_finalizers_hold_deletion_until_removed(kube):
    obj = job()
    obj['metadata']['finalizers'] = ['finetune.dev/cleanup']
    kube.create(obj, 'finetunejobs')
    deleting = kube.delete(FTJ, 'finetunejobs', 'job-1', 'default')
    assert deleting['metadata']['deletionTimestamp']
    assert kube.get(FTJ, 'finetunejobs', 'job-1', 'default')['metadata']['deletionTimestamp']
    with pytest.raises(ApiStatusError) as error:
        kube.patch(FTJ, 'finetunejobs', 'job-1', {'metadata': {'finalizers': ['finetune.dev/cleanup', 'new']}}, 'default')
    assert error.value.status == 422
    kube.patch(FTJ, 'finetunejobs', 'job-1', {'metadata': {'finalizers': None}}, 'default')
    assert kube.get_or_none(FTJ, 'finetunejobs', 'job-1', 'default') is None


@needs_kuberay_crd
def test_owner_deletion_collects_dependents(kube):
    owner = kube.create(job(), 'finetunejobs')
    kube.create(ray_cluster(owner=owner), 'rayclusters')
    secret = {'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {'name': 's', 'ownerReferences': [
        {'apiVersion': 'ray.io/v1', 'kind': 'RayCluster', 'name': 'rc-1',
         'uid': kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default')['metadata']['uid']}]}}
    kube.create(secret, 'secrets', 'default')
    kube.create({'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {'name': 'kept'}}, 'secrets', 'default')
    kube.delete(FTJ, 'finetunejobs', 'job-1', 'default')
    assert kube.get_or_none('ray.io/v1', 'rayclusters', 'rc-1', 'default') is None
    assert kube.get_or_none('v1', 'secrets', 's', 'default') is None  # transitively
    assert kube.get_or_none('v1', 'secrets', 'kept', 'default') is not None


def test_orphan_propagation_keeps_dependents(kube):
    owner = kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'owner'}}, 'configmaps', 'default')
    ref = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'name': 'owner', 'uid': owner['metadata']['uid']}
    kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'dep', 'ownerReferences': [ref]}}, 'configmaps', 'default')
    kube.delete('v1', 'configmaps', 'owner', 'default', propagationPolicy='Orphan')
    assert 'ownerReferences' not in kube.get('v1', 'configmaps', 'dep', 'default')['metadata']


def test_history_tells_objects_of_one_name_apart(kube):
    """What a test reads to know whether an object was replaced between two of its reads."""
    first = kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'cm'}}, 'configmaps', 'default')
    kube.patch('v1', 'configmaps', 'cm', {'data': {'k': 'v'}}, 'default')
    kube.delete('v1', 'configmaps', 'cm', 'default')
    second = kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'cm'}}, 'configmaps', 'default')
    changes = [(event, obj['metadata']['uid']) for event, obj in kube.history('v1', 'configmaps')
               if obj['metadata']['name'] == 'cm']
    one, two = first['metadata']['uid'], second['metadata']['uid']
    assert changes == [('ADDED', one), ('MODIFIED', one), ('DELETED', one), ('ADDED', two)]


# -- selectors, lists, watches --

def test_label_and_field_selectors(kube):
    for name, labels in [('a', {'app': 'x', 'tier': 'web'}), ('b', {'app': 'x', 'tier': 'db'}), ('c', {'app': 'y'})]:
        kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': name, 'labels': labels}}, 'configmaps', 'default')
    kube.create_namespace('other')
    kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'd', 'labels': {'app': 'x'}}}, 'configmaps', 'other')

    def names(namespace: str | None = 'default', **params: str) -> list[str]:
        return [obj['metadata']['name'] for obj in kube.list('v1', 'configmaps', namespace, **params)]
    assert names(labelSelector='app=x') == ['a', 'b']
    assert names(labelSelector='app=x,tier!=db') == ['a']
    assert names(labelSelector='tier in (web,db)') == ['a', 'b']
    assert names(labelSelector='tier notin (web),app') == ['b', 'c']
    assert names(labelSelector='!tier') == ['c']
    assert names(fieldSelector='metadata.name=b') == ['b']
    assert names(None, labelSelector='app=x') == ['a', 'b', 'd']  # cluster-wide
    listing = kube.request('GET', '/api/v1/configmaps')
    assert listing['kind'] == 'ConfigMapList' and listing['apiVersion'] == 'v1'
    page = kube.request('GET', '/api/v1/configmaps', params={'limit': '3'})
    assert len(page['items']) == 3 and page['metadata']['continue']
    rest = kube.request('GET', '/api/v1/configmaps', params={'limit': '3', 'continue': page['metadata']['continue']})
    assert len(rest['items']) == 1 and 'continue' not in rest['metadata']


def _watch(kube, path: str, params: dict[str, str], count: int, timeout: float = 5) -> list[dict[str, Any]]:
    query = '&'.join(f'{key}={value}' for key, value in {'watch': 'true', **params}.items())
    request = urllib.request.Request(f'{kube.url}{path}?{query}', headers={'Authorization': f'Bearer {kube.token}'})
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            events.append(json.loads(line))
            if len(events) == count:
                break
    return events


def test_watch_from_resource_version_with_selector(kube):
    listing = kube.request('GET', '/api/v1/namespaces/default/configmaps')
    rv = listing['metadata']['resourceVersion']
    kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'a', 'labels': {'w': '1'}}}, 'configmaps', 'default')
    kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'b'}}, 'configmaps', 'default')
    kube.patch('v1', 'configmaps', 'a', {'metadata': {'labels': {'w': None}}}, 'default')  # leaves the selector
    events = _watch(kube, '/api/v1/namespaces/default/configmaps', {'resourceVersion': rv, 'labelSelector': 'w=1'}, 2)
    assert [(e['type'], e['object']['metadata']['name']) for e in events] == [('ADDED', 'a'), ('DELETED', 'a')]


def test_watch_streams_live_events_and_initial_bookmark(kube):
    rv = kube.request('GET', '/api/v1/configmaps')['metadata']['resourceVersion']
    watch_list: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: watch_list.extend(_watch(
            kube, '/api/v1/namespaces/default/configmaps', {'sendInitialEvents': 'true', 'allowWatchBookmarks': 'true',
                                                            'resourceVersionMatch': 'NotOlderThan'}, 2))),
        threading.Thread(target=lambda: plain.extend(_watch(kube, '/api/v1/configmaps', {'resourceVersion': rv}, 1))),
    ]
    for thread in threads:
        thread.start()
    kube.wait_for(lambda: sum(c.verb == 'watch' for c in kube.recorder.calls_of('admin')) == 2)
    time.sleep(1.2)  # idle watches must survive their periodic wake-ups
    kube.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'live'}}, 'configmaps', 'default')
    for thread in threads:
        thread.join(5)
    assert watch_list[0]['type'] == 'BOOKMARK'
    assert watch_list[0]['object']['metadata']['annotations'] == {'k8s.io/initial-events-end': 'true'}
    assert (watch_list[1]['type'], watch_list[1]['object']['metadata']['name']) == ('ADDED', 'live')
    assert [(e['type'], e['object']['metadata']['name']) for e in plain] == [('ADDED', 'live')]


def test_too_old_resource_version_gets_410():
    emulator = make_emulator({'t': 'admin'}, history_size=3)
    with EmulatorThread(emulator) as runner:
        client = KubeClient(runner.url, 't')
        for i in range(5):
            client.create({'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': f'c{i}'}}, 'configmaps', 'default')
        kube = type('K', (), {'url': runner.url, 'token': 't'})
        [event] = _watch(kube, '/api/v1/configmaps', {'resourceVersion': '1'}, 1)
        assert event['type'] == 'ERROR' and event['object']['code'] == 410


# -- discovery, auth, recording --

def test_discovery_lists_what_kopf_and_kubectl_need(kube):
    assert kube.request('GET', '/api/v1')['groupVersion'] == 'v1'
    groups = {group['name'] for group in kube.request('GET', '/apis')['groups']}
    assert groups >= {'finetune.dev', 'kopf.dev', 'events.k8s.io', 'coordination.k8s.io', 'apiextensions.k8s.io'}
    resources = {r['name']: r for r in kube.request('GET', '/apis/finetune.dev/v1alpha1')['resources']}
    assert resources['finetunejobs']['namespaced'] and resources['finetunejobs']['shortNames'] == ['ftj']
    assert 'finetunejobs/status' in resources
    assert {r['name'] for r in kube.request('GET', '/apis/kopf.dev/v1')['resources']} == {'clusterkopfpeerings', 'kopfpeerings'}
    assert kube.create_kopf_peering()['metadata']['name'] == 'default'
    assert kube.request('GET', '/version')['major'] == '1'


def test_bearer_token_is_required_and_calls_are_recorded(kube):
    status, body = KubeClient(kube.url, 'wrong').request('GET', '/api/v1/namespaces', expect_status=True)
    assert (status, body['reason']) == (401, 'Unauthorized')
    operator = kube.client_for('operator')
    operator.create(job(), 'finetunejobs')
    operator.patch(FTJ, 'finetunejobs', 'job-1', {'status': {'phase': 'Pending'}}, 'default', subresource='status')
    operator.list(FTJ, 'finetunejobs')
    assert kube.recorder.verbs_by_resource('operator') == {
        ('finetune.dev', 'finetunejobs'): {'create', 'list'}, ('finetune.dev', 'finetunejobs/status'): {'patch'}}
    assert all(call.namespace in ('default', None) for call in kube.recorder.calls_of('operator'))


# -- scale --

def test_a_thousand_jobs_are_stored_and_listed(kube):
    # What 1,000 jobs cost the emulator is measured by `bench operator_scale`, not timed here.
    for i in range(1000):
        kube.create(job(f'job-{i}'), 'finetunejobs')
    listed = kube.list(FTJ, 'finetunejobs', 'default')
    assert sorted(j['metadata']['name'] for j in listed) == sorted(f'job-{i}' for i in range(1000))
    assert kube.get(FTJ, 'finetunejobs', 'job-999', 'default')['metadata']['name'] == 'job-999'


# -- the KubeRay stand-in (its published head address is a placeholder here; see the e2e test) --

@needs_kuberay_crd
def test_kuberay_standin_makes_clusters_ready_and_creates_auth_secret(kube):
    head = HeadAddress('127.0.0.1', 6380, 8266, 10002, token='head-token')
    with KubeRayStandIn(kube.url, kube.add_identity('kuberay-operator'), head, ready_delay=0.05) as standin:
        owner = kube.create(job(), 'finetunejobs')
        kube.create(ray_cluster(owner=owner), 'rayclusters')
        ready = kube.wait_for(lambda: (kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default').get('status') or {}).get('state') == 'ready'
                              and kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default'))
        status = ready['status']
        assert status['endpoints']['dashboard'] == '8266' and status['head']['podIP'] == '127.0.0.1'
        assert status['readyWorkerReplicas'] == 2 and status['availableWorkerReplicas'] == 2
        assert {c['type']: c['status'] for c in status['conditions']} == {'HeadPodReady': 'True', 'RayClusterProvisioned': 'True'}
        secret = kube.get('v1', 'secrets', 'rc-1', 'default')
        assert secret['metadata']['ownerReferences'][0]['uid'] == ready['metadata']['uid']
        # A lost head, as KubeRay >= 1.2 reports it: HeadPodReady False, state still ready.
        head_pod = status['head']['podName']
        standin.lose_head('default', 'rc-1')
        down = kube.wait_for(lambda: (lambda c: c if {x['type']: x['status'] for x in c['status']['conditions']}
                                      ['HeadPodReady'] == 'False' else None)(
            kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default')))
        assert down['status']['state'] == 'ready'
        time.sleep(0.3)  # stays down until the new head is ready
        assert {x['type']: x['status'] for x in kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default')
                ['status']['conditions']}['HeadPodReady'] == 'False'
        standin.replace_head('default', 'rc-1')
        back = kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default')['status']
        assert back['head']['podName'] != head_pod and back['state'] == 'ready'
        assert {x['type']: x['status'] for x in back['conditions']}['HeadPodReady'] == 'True'
        kube.delete(FTJ, 'finetunejobs', 'job-1', 'default')
        assert kube.get_or_none('v1', 'secrets', 'rc-1', 'default') is None  # job → cluster → secret
        assert not standin.errors


@needs_kuberay_crd
def test_kuberay_standin_waits_out_an_earlier_clusters_secret(kube):
    # A RayCluster recreated under its old name while the garbage collector has not yet removed
    # the old one's token Secret: KubeRay makes a Secret of its own once the old one is gone,
    # and the cluster's token is never the old one.
    head = HeadAddress('127.0.0.1', 6380, 8266, 10002, token='head-token')
    with KubeRayStandIn(kube.url, kube.add_identity('kuberay-operator'), head, ready_delay=0.05) as standin:
        kube.create({'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {
            'name': 'rc-2', 'ownerReferences': [{'apiVersion': 'ray.io/v1', 'kind': 'RayCluster', 'name': 'rc-2',
                                                 'uid': 'an-earlier-cluster'}]},
            'data': {'auth_token': 'b2xk'}}, 'secrets', 'default')
        created = kube.create(ray_cluster('rc-2'), 'rayclusters')
        # (The emulator's garbage collector removes the stale Secret, whose owner is gone.)
        kube.wait_for(lambda: (kube.get('ray.io/v1', 'rayclusters', 'rc-2', 'default').get('status') or {})
                      .get('state') == 'ready')
        secret = kube.get('v1', 'secrets', 'rc-2', 'default')
        assert secret['metadata']['ownerReferences'][0]['uid'] == created['metadata']['uid']
        assert secret['data']['auth_token'] != 'b2xk'
        assert not standin.errors


# -- real clients: kopf and kubectl --

def test_kopf_operator_runs_against_the_emulator(kube):
    import kopf

    token = kube.add_identity('operator')
    registry = kopf.OperatorRegistry()
    operator_client = KubeClient(kube.url, token)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=kube.url, scheme='Bearer', token=token, insecure=True)

    @kopf.on.create('finetune.dev', 'v1alpha1', 'finetunejobs', registry=registry)
    def create_cluster(body: Any, name: str, namespace: str, patch: Any, **_: Any) -> None:
        cluster = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': f'{name}-cluster'}}
        if KUBERAY_CRD.exists():
            cluster = ray_cluster(f'{name}-cluster', namespace)
        kopf.adopt(cluster, owner=body)
        operator_client.create(cluster, 'rayclusters' if KUBERAY_CRD.exists() else 'configmaps', namespace)
        patch.status['phase'] = 'Provisioning'

    stop = threading.Event()

    def run() -> None:
        # Not standalone: kopf's peering (kopf.dev/v1 clusterkopfpeerings) runs against the emulator too.
        asyncio.run(kopf.operator(registry=registry, clusterwide=True, peering_name='default', stop_flag=stop))
    kube.create_kopf_peering()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        kube.create(job(), 'finetunejobs')
        done = kube.wait_for(lambda: (kube.get(FTJ, 'finetunejobs', 'job-1', 'default').get('status') or {}).get('phase'), timeout=20)
        assert done == 'Provisioning'
        plural = 'rayclusters' if KUBERAY_CRD.exists() else 'configmaps'
        api = 'ray.io/v1' if KUBERAY_CRD.exists() else 'v1'
        cluster = kube.get(api, plural, 'job-1-cluster', 'default')
        assert cluster['metadata']['ownerReferences'][0]['kind'] == 'FineTuneJob'
        used = kube.recorder.verbs_by_resource('operator')
        assert {'list', 'watch', 'patch'} <= used[('finetune.dev', 'finetunejobs')] | used.get(('finetune.dev', 'finetunejobs/status'), set())
        peers = kube.wait_for(lambda: kube.get('kopf.dev/v1', 'clusterkopfpeerings', 'default').get('status'))
        assert len(peers) == 1  # this operator announced itself
        kube.delete(FTJ, 'finetunejobs', 'job-1', 'default')
        assert kube.get_or_none(api, plural, 'job-1-cluster', 'default') is None
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()


JOB_YAML = """
apiVersion: finetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  model: {{uri: "hf://org/model"}}
  dataset: {{uri: "s3://bucket/data.jsonl"}}
  checkpoint: {{uri: "s3://bucket/ckpt"}}
  resources: {{workers: {workers}}}
"""


def test_kubectl_apply_get_patch_delete(kube):
    result = kube.kubectl('apply', '-f', '-', input=JOB_YAML.format(name='via-kubectl', workers=2))
    assert 'finetunejob.finetune.dev/via-kubectl created' in result.stdout
    got = json.loads(kube.kubectl('get', 'ftj', 'via-kubectl', '-o', 'json').stdout)
    assert got['spec']['resources']['workers'] == 2 and got['spec']['training']['seed'] == 42
    result = kube.kubectl('apply', '-f', '-', input=JOB_YAML.format(name='via-kubectl', workers=3))
    assert 'configured' in result.stdout
    assert kube.get(FTJ, 'finetunejobs', 'via-kubectl', 'default')['metadata']['generation'] == 2
    kube.kubectl('patch', 'ftj', 'via-kubectl', '--subresource=status', '--type=merge', '-p', '{"status":{"phase":"Running"}}')
    table = kube.kubectl('get', 'finetunejobs').stdout
    assert 'PHASE' in table and 'via-kubectl' in table and 'Running' in table
    kube.kubectl('wait', '--for=jsonpath={.status.phase}=Running', 'ftj/via-kubectl', '--timeout=10s')
    server_side = kube.kubectl('apply', '--server-side', '-f', '-', input=JOB_YAML.format(name='ssa', workers=1))
    assert 'serverside-applied' in server_side.stdout
    assert 'deleted' in kube.kubectl('delete', 'ftj', 'via-kubectl').stdout
    assert kube.get_or_none(FTJ, 'finetunejobs', 'via-kubectl', 'default') is None


def test_kubectl_shows_the_refused_field(kube):
    result = kube.kubectl('apply', '-f', '-', input=JOB_YAML.format(name='bad', workers=0), check=False)
    assert result.returncode != 0
    assert 'The FineTuneJob "bad" is invalid' in result.stderr
    assert 'spec.resources.workers: Invalid value: 0' in result.stderr
    unknown = kube.kubectl('apply', '-f', '-', input=JOB_YAML.format(name='odd', workers=1) + '  bogus: 1\n', check=False)
    assert unknown.returncode != 0 and 'strict decoding error: unknown field "spec.bogus"' in unknown.stderr


def test_emulator_runs_as_its_own_process(tmp_path):
    kubeconfig = tmp_path / 'kubeconfig'
    process = subprocess.Popen([sys.executable, '-m', 'finetune_testbed.emulator', '--token', 'bench=secret-token',
                                '--kubeconfig', str(kubeconfig)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(process.stdout.readline())
        assert info['token'] == 'secret-token' and info['https_url'].startswith('https://')
        client = KubeClient(info['url'], 'secret-token')
        client.create(job(), 'finetunejobs')
        assert [j['metadata']['name'] for j in client.list(FTJ, 'finetunejobs')] == ['job-1']
        assert kubeconfig.exists()
    finally:
        process.terminate()
        assert process.wait(20) == 0


# -- a real Ray head (slow: starts Ray) --

@pytest.mark.e2e
@needs_kuberay_crd
def test_ray_cluster_from_kuberay_points_at_a_real_head_that_runs_jobs(kube, kuberay, ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    kube.create(ray_cluster(), 'rayclusters')
    cluster = kube.wait_for(lambda: (c := kube.get('ray.io/v1', 'rayclusters', 'rc-1', 'default')).get('status', {}).get('state') == 'ready' and c)
    status = cluster['status']
    dashboard = f"http://{status['head']['serviceIP']}:{status['endpoints']['dashboard']}"
    assert dashboard == ray_head.dashboard_url
    secret = kube.get('v1', 'secrets', 'rc-1', 'default')
    token = base64.b64decode(secret['data']['auth_token']).decode()
    assert token == ray_head.token

    with pytest.raises(Exception):  # token auth is really on: no token, no jobs
        JobSubmissionClient(dashboard).list_jobs()
    client = JobSubmissionClient(dashboard, headers={'Authorization': f'Bearer {token}'})
    script = 'import ray; ray.init(); print("sum", ray.get(ray.remote(lambda: 1 + 2).remote()))'
    job_id = client.submit_job(entrypoint=f"python -c '{script}'")
    deadline = time.monotonic() + 90
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, 'the Ray job did not finish'
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert 'sum 3' in client.get_job_logs(job_id)
