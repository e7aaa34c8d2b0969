-- A revocation that needs a secret to end the credential (a Looker session is ended with
-- its own token): the secret, AES-256-GCM encrypted under the broker's
-- `revocation_secret_key` (12-byte random nonce followed by ciphertext and tag; the issuance
-- id is the associated data, so a value cannot be moved to another row). Set to null as soon
-- as the revocation succeeded or was given up.
alter table revocations add column sealed_secret bytea;

-- `revocations.reason` (free text, see 0005) also takes `superseded`: `credbroker exec` renewed
-- the credential and released the one it replaced.
