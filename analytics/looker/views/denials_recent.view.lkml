view: denials_recent {
  sql_table_name: denials_recent ;;

  dimension: id {
    primary_key: yes
    type: string
    sql: ${TABLE}.id ;;
  }

  dimension_group: occurred {
    type: time
    timeframes: [raw, time, hour, date, week]
    sql: ${TABLE}.occurred_at ;;
  }

  dimension: code {
    type: string
    sql: ${TABLE}.code ;;
  }

  dimension: detail {
    type: string
    sql: ${TABLE}.detail ;;
  }

  dimension: issuer {
    type: string
    sql: ${TABLE}.issuer ;;
  }

  dimension: subject {
    type: string
    sql: ${TABLE}.subject ;;
  }

  dimension: project_path {
    type: string
    sql: ${TABLE}.project_path ;;
  }

  dimension: namespace_path {
    type: string
    sql: ${TABLE}.namespace_path ;;
  }

  dimension: pipeline_id {
    type: string
    sql: ${TABLE}.pipeline_id ;;
  }

  dimension: job_id {
    type: string
    sql: ${TABLE}.job_id ;;
  }

  dimension: git_ref {
    label: "Ref"
    type: string
    sql: ${TABLE}.ref ;;
  }

  dimension: sha {
    type: string
    sql: ${TABLE}.sha ;;
  }

  dimension: user_login {
    type: string
    sql: ${TABLE}.user_login ;;
  }

  dimension: role {
    type: string
    sql: ${TABLE}.role ;;
  }

  dimension: target {
    type: string
    sql: ${TABLE}.target ;;
  }

  dimension: client_addr {
    type: string
    sql: ${TABLE}.client_addr ;;
  }

  measure: denials {
    type: sum
    description: "Refusals, counting each of an aggregated row's occurrences"
    sql: ${TABLE}.occurrences ;;
  }

  measure: subjects {
    type: count_distinct
    sql: ${TABLE}.subject ;;
  }
}
