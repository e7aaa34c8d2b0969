view: credential_lineage {
  sql_table_name: credential_lineage ;;

  dimension: id {
    primary_key: yes
    type: string
    sql: ${TABLE}.id ;;
  }

  dimension_group: occurred {
    type: time
    timeframes: [raw, time, date, week]
    sql: ${TABLE}.occurred_at ;;
  }

  dimension: decision {
    description: "issued (a first issuance or a renewal), admin_request (a release by the job), revoked, revoke_failed"
    type: string
    sql: ${TABLE}.decision ;;
  }

  dimension: role {
    type: string
    sql: ${TABLE}.role ;;
  }

  dimension: target {
    type: string
    sql: ${TABLE}.target ;;
  }

  dimension: backend {
    type: string
    sql: ${TABLE}.backend ;;
  }

  dimension: project_path {
    type: string
    sql: ${TABLE}.project_path ;;
  }

  dimension: pipeline_id {
    type: string
    sql: ${TABLE}.pipeline_id ;;
  }

  dimension: job_id {
    type: string
    sql: ${TABLE}.job_id ;;
  }

  dimension_group: expires {
    type: time
    timeframes: [raw, time, date]
    sql: ${TABLE}.expires_at ;;
  }

  dimension: renews_issuance_id {
    description: "On a renewal: the first issuance of its chain"
    type: string
    sql: ${TABLE}.renews_issuance_id ;;
  }

  dimension: about_issuance_id {
    description: "On a revocation or release: the issuance it is about"
    type: string
    sql: ${TABLE}.about_issuance_id ;;
  }

  dimension: first_issuance_id {
    description: "The chain this step belongs to: its first issuance"
    type: string
    sql: ${TABLE}.first_issuance_id ;;
  }

  measure: chains {
    description: "Credentials as jobs see them: a first issuance and its renewals count once"
    type: count_distinct
    sql: ${first_issuance_id} ;;
  }

  measure: renewals {
    type: sum
    sql: case when ${TABLE}.decision = 'issued' and ${TABLE}.renews_issuance_id is not null then 1 else 0 end ;;
  }

  measure: revocations {
    type: sum
    sql: case when ${TABLE}.decision = 'revoked' then 1 else 0 end ;;
  }
}
