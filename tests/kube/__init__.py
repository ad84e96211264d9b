"""A Kubernetes API emulator (built on kmock), a KubeRay stand-in and a real Ray head for e2e tests."""
