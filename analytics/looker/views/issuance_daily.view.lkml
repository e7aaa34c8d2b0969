view: issuance_daily {
  sql_table_name: issuance_daily ;;

  dimension: key {
    primary_key: yes
    hidden: yes
    type: string
    sql: concat(${TABLE}.day, '|', coalesce(${TABLE}.role, ''), '|', coalesce(${TABLE}.target, ''), '|', coalesce(${TABLE}.project_path, ''), '|', ${TABLE}.decision) ;;
  }

  dimension_group: day {
    type: time
    timeframes: [date, week, month, quarter, year]
    datatype: date
    convert_tz: no
    sql: ${TABLE}.day ;;
  }

  dimension: role {
    type: string
    sql: ${TABLE}.role ;;
  }

  dimension: target {
    type: string
    sql: ${TABLE}.target ;;
  }

  dimension: project_path {
    type: string
    sql: ${TABLE}.project_path ;;
  }

  dimension: decision {
    type: string
    sql: ${TABLE}.decision ;;
  }

  measure: events {
    type: sum
    sql: ${TABLE}.events ;;
  }

  measure: issued {
    type: sum
    sql: case when ${TABLE}.decision = 'issued' then ${TABLE}.events else 0 end ;;
  }

  measure: denied {
    type: sum
    sql: case when ${TABLE}.decision = 'denied' then ${TABLE}.events else 0 end ;;
  }

  measure: denial_rate {
    type: number
    value_format_name: percent_1
    sql: 1.0 * ${denied} / nullif(${events}, 0) ;;
  }

  measure: subject_days {
    type: sum
    description: "Distinct subjects per day and group, added up: a subject active on two days counts twice"
    sql: ${TABLE}.subjects ;;
  }

  measure: pipeline_days {
    type: sum
    description: "Distinct pipelines per day and group, added up"
    sql: ${TABLE}.pipelines ;;
  }
}
