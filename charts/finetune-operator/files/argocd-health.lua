-- Argo CD health check for finetune.dev/FineTuneJob.
-- Install: the argocd-cm key resource.customizations.health.finetune.dev_FineTuneJob holds
-- this script (docs/gitops.md). Argo CD sets the global `obj` to the live object; the script
-- returns {status = Healthy|Progressing|Suspended|Degraded, message = ...}.
local hs = {}

local function phase_message(default)
  if obj.status.message ~= nil and obj.status.message ~= "" then
    return obj.status.message
  end
  return default
end

if obj.status == nil or obj.status.phase == nil or obj.status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the job"
  return hs
end

-- A status written for an older spec says nothing yet about the current one.
if obj.metadata ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end

local phase = obj.status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = phase_message("Fine-tuning finished")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = phase_message("Fine-tuning failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = phase_message("Suspended (spec.runPolicy.suspend)")
elseif phase == "Pending" or phase == "Provisioning" or phase == "Running" or phase == "Retrying" then
  hs.status = "Progressing"
  local message = phase_message(phase)
  local progress = obj.status.progress
  if phase == "Running" and progress ~= nil and progress.percent ~= nil then
    message = message .. " (" .. string.format("%d", math.floor(progress.percent)) .. "%)"
  end
  hs.message = message
else
  -- A phase this script does not know (a newer operator): say so rather than guess.
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
