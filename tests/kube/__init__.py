"""Tests of the test bed itself (finetune_testbed): the emulator and the KubeRay stand-in."""
