view: long_lived_overshoots {
  sql_table_name: long_lived_overshoots ;;

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

  dimension: user_login {
    type: string
    sql: ${TABLE}.user_login ;;
  }

  dimension: granted_ttl_seconds {
    type: number
    sql: ${TABLE}.granted_ttl_seconds ;;
  }

  dimension: overshoot_seconds {
    type: number
    sql: ${TABLE}.overshoot_seconds ;;
  }

  dimension_group: expires {
    type: time
    timeframes: [raw, time]
    sql: ${TABLE}.expires_at ;;
  }

  dimension_group: job_deadline {
    type: time
    timeframes: [raw, time]
    sql: ${TABLE}.job_deadline ;;
  }

  dimension: revocation_state {
    type: string
    sql: ${TABLE}.revocation_state ;;
  }

  dimension_group: revoked {
    type: time
    timeframes: [raw, time]
    sql: ${TABLE}.revoked_at ;;
  }

  measure: credentials {
    type: count
  }

  measure: total_overshoot_seconds {
    type: sum
    sql: ${TABLE}.overshoot_seconds ;;
  }

  measure: longest_overshoot_seconds {
    type: max
    sql: ${TABLE}.overshoot_seconds ;;
  }

  measure: not_ended_by_the_broker {
    type: sum
    description: "Overshooting credentials the broker has not revoked (yet)"
    sql: case when ${TABLE}.revoked_at is null then 1 else 0 end ;;
  }
}
