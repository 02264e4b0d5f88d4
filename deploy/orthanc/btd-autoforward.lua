-- Demo auto-routing for the compose `demo` profile: Orthanc plays the hospital PACS and forwards every
-- complete (stable) CT or MR series to btd, as a site's routing rule would. Other modalities, and
-- above all SR and KO (btd's own results coming back), are not forwarded: a report sent back to btd
-- would reopen its study and loop.
local FORWARDED_MODALITIES = { CT = true, MR = true }

function OnStableSeries(seriesId, tags, metadata)
  if FORWARDED_MODALITIES[tags['Modality']] then
    print('btd demo: forwarding ' .. tags['Modality'] .. ' series ' .. seriesId .. ' to btd')
    RestApiPost('/modalities/btd/store', DumpJson({ Resources = { seriesId }, Asynchronous = true }, true))
  end
end
