-- audit.edits: one row per inserted, updated or deleted row and per TRUNCATE statement.

SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL ROLE audit_proxy_owner;

CREATE TABLE IF NOT EXISTS audit.edits (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tablename text NOT NULL,
  username text NOT NULL,
  fullname text,
  action character(1) NOT NULL CHECK (action IN ('I', 'U', 'D', 'T')),
  old jsonb,
  new jsonb,
  changed text[],
  query text,
  txid bigint NOT NULL,
  recorded timestamptz NOT NULL,
  db_user text NOT NULL,
  attributed boolean NOT NULL
);

COMMENT ON TABLE audit.edits IS
  'Audit trail written by the trigger function audit.record_edit(); applications may only read it.';
COMMENT ON COLUMN audit.edits.tablename IS
  'Schema-qualified name of the changed table, quoted where SQL needs it, e.g. public.accounts.';
COMMENT ON COLUMN audit.edits.username IS
  'empnum of the identity the connection carried, or session_user when it carried none.';
COMMENT ON COLUMN audit.edits.fullname IS
  'fullname of the identity the connection carried; null when unattributed.';
COMMENT ON COLUMN audit.edits.action IS
  'I for INSERT, U for UPDATE, D for DELETE, T for TRUNCATE.';
COMMENT ON COLUMN audit.edits.old IS
  'Row before an UPDATE or DELETE, as jsonb.';
COMMENT ON COLUMN audit.edits.new IS
  'Row after an INSERT or UPDATE, as jsonb.';
COMMENT ON COLUMN audit.edits.changed IS
  'For an UPDATE, the columns whose values differ, in table column order; null for other actions.';
COMMENT ON COLUMN audit.edits.query IS
  'Text of the top-level statement the client sent (current_query()).';
COMMENT ON COLUMN audit.edits.txid IS
  'Transaction id (txid_current()); rows of one transaction share it.';
COMMENT ON COLUMN audit.edits.recorded IS
  'Start time of the transaction (now()).';
COMMENT ON COLUMN audit.edits.db_user IS
  'Role that logged in to PostgreSQL (session_user).';
COMMENT ON COLUMN audit.edits.attributed IS
  'Whether the connection carried an identity with a non-empty empnum.';

REVOKE ALL ON TABLE audit.edits FROM PUBLIC;

RESET ROLE;
