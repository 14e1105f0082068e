module blazen-fleet/pause

go 1.22
