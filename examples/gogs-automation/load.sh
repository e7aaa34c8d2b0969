#!/bin/sh
# The job: here it only shows what it was given. A real loader would use the credential.
echo "loading $GOGS_REPOSITORY at $GOGS_SHA ($GOGS_REF) as ${KAFKA_PRINCIPAL:-?}"
